"""Explicit SIMD where the auto-vectoriser cannot help: a vector type and a few intrinsics.

The small-K tile kernels (fastsce._kernels.tiles) need a (R, K) block of rows turned into
(K, R) and back. Element by element LLVM makes that a vgatherdps / vscatterdps per class,
~0.4 ns per element, more than the exp. Here a block of W rows x W classes is read with
W masked loads (a row's classes c0 .. c0 + n; no remainder loop, nothing read past the
row), transposed in registers with shufflevector, and written with W masked stores.

``Vec(dtype, W)`` is an LLVM vector <W x dtype>, W = 16 lanes (8 for float64: one zmm
either way; float16 / bfloat16 bits also take 16 lanes, to meet float32). Each intrinsic
below is one LLVM operation (or a fixed sequence of them) built by one helper, tested one
by one against NumPy in tests/test_simd.py:

    load_rows(a, start, stride, rows, cols)    -> W Vecs: row i = a.flat[start + i stride + j],
                                                  j < cols, for i < rows; 0 elsewhere
    store_rows(a, start, stride, rows, cols, v)   the inverse: only those elements written
    transpose(v)                               -> the W x W block transposed
    widen(v)                                   -> float16 / bfloat16 bits as float32 (floats as they are)
    narrow(v, a)                               -> float32 rounded to a's element type (nearest even)
    prefetch(a, i)                                hint: bring a.flat[i]'s cache line in
    float16_bits_to_float32(h), float32_to_float16_bits(x)
                                                  one element (fpext / fptrunc): in a loop
                                                  LLVM makes them vcvtph2ps / vcvtps2ph
    bfloat16_bits_to_float32(b), float32_to_bfloat16_bits(x)
                                                  one element, as widen / narrow do it, in
                                                  32-bit integer lanes

Addresses are not checked: ``a`` must be C-contiguous and every element addressed (by
the masks) inside it; the kernels guarantee that. Masked-off lanes touch no memory.
"""

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, models, overload, register_model

# --- the vector type -------------------------------------------------------------------------


class Vec(types.Type):
    """<width x dtype> in one register (or two, for 16 float64 lanes without AVX-512)."""

    def __init__(self, dtype, width):
        self.dtype = dtype
        self.width = width
        super().__init__(name=f"Vec({dtype}, {width})")


@register_model(Vec)
class _VecModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        element = dmm.lookup(fe_type.dtype).get_value_type()
        super().__init__(dmm, fe_type, ir.VectorType(element, fe_type.width))


def lanes(dtype):
    """Lanes of a Vec of this element type: 512 bits of float32 / float64; half bits
    take 16 lanes, as many as the float32 they become."""
    return 8 if dtype.bitwidth == 64 else 16


def width(a):
    """W for array a, as a compile-time constant in jitted code."""
    raise NotImplementedError  # only callable from jitted code


@overload(width)
def _width(a):
    w = lanes(a.dtype)
    return lambda a: w


def _block(dtype):
    """The Numba type of W Vecs: a W x W block, one Vec per row."""
    w = lanes(dtype)
    return types.UniTuple(Vec(dtype, w), w)


_I32 = ir.IntType(32)


def _const_vector(element, values):
    return ir.Constant(ir.VectorType(element, len(values)), list(values))


def _splat(builder, value, width):
    """<width x value> from a scalar."""
    vt = ir.VectorType(value.type, width)
    v = builder.insert_element(ir.Constant(vt, ir.Undefined), value, ir.Constant(_I32, 0))
    return builder.shuffle_vector(v, v, _const_vector(_I32, [0] * width))


def _row_mask(builder, width, cols, row_live):
    """<width x i1>: lane j < cols (an i64), all false when not row_live (an i1)."""
    mask = builder.icmp_signed("<", _const_vector(ir.IntType(64), range(width)), _splat(builder, cols, width))
    return builder.and_(mask, _splat(builder, row_live, width))


def _rows_addressed(context, builder, sig, args, width):
    """(pointer, mask) of each of the block's ``width`` rows (args: a, start, stride, rows, cols)."""
    data = context.make_array(sig.args[0])(context, builder, args[0]).data
    i64 = ir.IntType(64)
    start, stride, rows, cols = (context.cast(builder, x, t, types.int64) for x, t in zip(args[1:5], sig.args[1:5]))
    out = []
    for i in range(width):
        offset = builder.add(start, builder.mul(stride, ir.Constant(i64, i)))
        live = builder.icmp_signed(">", rows, ir.Constant(i64, i))
        out.append((builder.gep(data, [offset]), _row_mask(builder, width, cols, live)))
    return out


def _masked(builder, name, vt, ptr):
    """Declares llvm.masked.<name>.<vector>.p0 (name: "load" or "store")."""
    suffix = f"v{vt.count}{'f' if isinstance(vt.element, (ir.FloatType, ir.DoubleType)) else 'i'}{_bits(vt.element)}"
    mask = ir.VectorType(ir.IntType(1), vt.count)
    if name == "load":  # (pointer, alignment, mask, pass-through)
        fnty = ir.FunctionType(vt, [ptr.type, _I32, mask, vt])
    else:  # (value, pointer, alignment, mask)
        fnty = ir.FunctionType(ir.VoidType(), [vt, ptr.type, _I32, mask])
    return builder.module.declare_intrinsic(f"llvm.masked.{name}.{suffix}.p0", fnty=fnty)


def _bits(element):
    if isinstance(element, ir.FloatType):
        return 32
    if isinstance(element, ir.DoubleType):
        return 64
    return element.width


def _check_index(*xs):
    return all(isinstance(x, types.Integer) for x in xs)


# --- memory ---------------------------------------------------------------------------------


@intrinsic
def load_rows(typingctx, a, start, stride, rows, cols):
    """W masked loads: Vec i = a.flat[start + i stride + (0 .. cols - 1)] for i < rows,
    zero lanes (and zero Vecs) elsewhere. vmovups (%r), %zmm {k}{z} each."""
    if not (isinstance(a, types.Array) and _check_index(start, stride, rows, cols)):
        return None
    block = _block(a.dtype)
    sig = block(a, start, stride, rows, cols)

    def codegen(context, builder, sig, args):
        vt = context.get_value_type(block.dtype)
        align = ir.Constant(_I32, a.dtype.bitwidth // 8)
        zero = ir.Constant(vt, None)
        vecs = []
        for ptr, mask in _rows_addressed(context, builder, sig, args, vt.count):
            fn = _masked(builder, "load", vt, ptr)
            vecs.append(builder.call(fn, [ptr, align, mask, zero]))
        return context.make_tuple(builder, sig.return_type, vecs)

    return sig, codegen


@intrinsic
def store_rows(typingctx, a, start, stride, rows, cols, block):
    """The inverse of load_rows: a.flat[start + i stride + j] = block[i][j] for i < rows,
    j < cols; nothing else written. vmovups %zmm, (%r) {k} each."""
    if not (isinstance(a, types.Array) and _check_index(start, stride, rows, cols)):
        return None
    if not (isinstance(block, types.UniTuple) and block == _block(a.dtype)):
        return None
    sig = types.none(a, start, stride, rows, cols, block)

    def codegen(context, builder, sig, args):
        vt = context.get_value_type(block.dtype)
        align = ir.Constant(_I32, a.dtype.bitwidth // 8)
        vecs = cgutils.unpack_tuple(builder, args[5], vt.count)
        for v, (ptr, mask) in zip(vecs, _rows_addressed(context, builder, sig, args, vt.count)):
            builder.call(_masked(builder, "store", vt, ptr), [v, ptr, align, mask])
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def prefetch(typingctx, a, i):
    """llvm.prefetch of a.flat[i] for reading, kept in every cache level (prefetcht0)."""
    if not (isinstance(a, types.Array) and _check_index(i)):
        return None

    def codegen(context, builder, sig, args):
        data = context.make_array(sig.args[0])(context, builder, args[0]).data
        # as i8*: the module declares llvm.prefetch.p0 once, for every array's element type
        ptr = builder.bitcast(builder.gep(data, [args[1]]), ir.IntType(8).as_pointer())
        fn = builder.module.declare_intrinsic(
            "llvm.prefetch.p0", fnty=ir.FunctionType(ir.VoidType(), [ptr.type, _I32, _I32, _I32])
        )
        builder.call(fn, [ptr, ir.Constant(_I32, 0), ir.Constant(_I32, 3), ir.Constant(_I32, 1)])
        return context.get_dummy_value()

    return types.none(a, i), codegen


# --- shuffles -------------------------------------------------------------------------------


def transpose_indices(width, bit):
    """The shufflevector masks of one transpose stage: rows i (bit clear) and i | bit
    swap the elements (i | bit, j) and (i, j | bit), j with bit clear. Swapping bit b
    of the row and the lane index for every b transposes the block (Eklundh)."""
    low = [j if j & bit == 0 else width + j - bit for j in range(width)]
    high = [j + bit if j & bit == 0 else width + j for j in range(width)]
    return low, high


@intrinsic
def transpose(typingctx, block):
    """W x W block transposed: log2(W) stages of W two-source shuffles (vpermt2ps /
    vunpck*ps / vshuff32x4), no memory."""
    if not (isinstance(block, types.UniTuple) and isinstance(block.dtype, Vec) and block.count == block.dtype.width):
        return None

    def codegen(context, builder, sig, args):
        rows = cgutils.unpack_tuple(builder, args[0], block.count)
        return context.make_tuple(builder, sig.return_type, transposed(builder, rows))

    return block(block), codegen


def transposed(builder, rows):
    """The IR of transpose: W vectors of W lanes in, their transpose out (a new list)."""
    rows = list(rows)
    width = len(rows)
    bit = width // 2
    while bit:
        low, high = transpose_indices(width, bit)
        for i in range(width):
            if i & bit == 0:
                a, b = rows[i], rows[i | bit]
                rows[i] = builder.shuffle_vector(a, b, _const_vector(_I32, low))
                rows[i | bit] = builder.shuffle_vector(a, b, _const_vector(_I32, high))
        bit //= 2
    return rows


# --- conversions ----------------------------------------------------------------------------
#
# float16 bits (uint16) <-> float32 are vcvtph2ps / vcvtps2ph (exact / round to nearest
# even, subnormals kept: MXCSR's DAZ / FTZ are off). bfloat16 bits (int16) -> float32 is a
# shift into the high half; float32 -> bfloat16 rounds to nearest even in integers, NaN
# kept NaN (quiet), as fastsce._kernels.half does (not vcvtneps2bf16: it flushes subnormals).


def _map_block(builder, context, block_value, width, fn):
    vecs = cgutils.unpack_tuple(builder, block_value, width)
    return [fn(v) for v in vecs]


@intrinsic
def widen(typingctx, block):
    """A block of half bits as float32 (float blocks unchanged)."""
    if not (isinstance(block, types.UniTuple) and isinstance(block.dtype, Vec)):
        return None
    dt, w = block.dtype.dtype, block.dtype.width
    if isinstance(dt, types.Float):
        return block(block), lambda context, builder, sig, args: args[0]
    if not (isinstance(dt, types.Integer) and dt.bitwidth == 16):
        return None
    out = types.UniTuple(Vec(types.float32, w), w)

    def codegen(context, builder, sig, args):
        def one(v):
            return half_bits_to_float32(builder, v, bfloat=dt.signed)

        return context.make_tuple(builder, out, _map_block(builder, context, args[0], w, one))

    return out(block), codegen


@intrinsic
def narrow(typingctx, block, a):
    """A float block as a's element type: the same float type unchanged, float32 to half
    bits rounded to nearest even."""
    if not (isinstance(block, types.UniTuple) and isinstance(block.dtype, Vec) and isinstance(a, types.Array)):
        return None
    dt, w, target = block.dtype.dtype, block.dtype.width, a.dtype
    if dt == target:
        return block(block, a), lambda context, builder, sig, args: args[0]
    if not (dt == types.float32 and isinstance(target, types.Integer) and target.bitwidth == 16):
        return None
    out = types.UniTuple(Vec(target, w), w)

    def codegen(context, builder, sig, args):
        def one(v):
            return float32_to_half_bits(builder, v, bfloat=target.signed)

        return context.make_tuple(builder, out, _map_block(builder, context, args[0], w, one))

    return out(block, a), codegen


def _like(ty, element):
    """element, or a vector of it as long as ty (a vector type)."""
    return ir.VectorType(element, ty.count) if isinstance(ty, ir.VectorType) else element


def _constant(ty, value):
    return ir.Constant(ty, [value] * ty.count if isinstance(ty, ir.VectorType) else value)


def half_bits_to_float32(builder, bits, bfloat):
    """IR: float16 (bfloat16 when ``bfloat``) bits, i16 or <W x i16>, as float32 (or <W x
    float>), exactly."""
    f32 = _like(bits.type, ir.FloatType())
    if bfloat:
        i32 = _like(bits.type, _I32)
        return builder.bitcast(builder.shl(builder.zext(bits, i32), _constant(i32, 16)), f32)  # float32's high half
    return builder.fpext(builder.bitcast(bits, _like(bits.type, ir.HalfType())), f32)


def float32_to_half_bits(builder, x, bfloat):
    """IR: float32 (or <W x float>) rounded to nearest even into float16 (bfloat16 when
    ``bfloat``; a NaN stays a quiet NaN) bits, i16 or <W x i16>."""
    i16 = _like(x.type, ir.IntType(16))
    if bfloat:
        i32 = _like(x.type, _I32)
        return builder.trunc(_bfloat16_round(builder, builder.bitcast(x, i32), lambda v: _constant(i32, v)), i16)
    return builder.bitcast(builder.fptrunc(x, _like(x.type, ir.HalfType())), i16)


def _bfloat16_round(builder, u, const):
    """float32 bits u (i32 or <W x i32>) rounded to bfloat16 (nearest even; a NaN stays a
    quiet NaN), as i32 values in 0 .. 0xFFFF. const(x): x as a constant of u's type."""
    odd = builder.and_(builder.lshr(u, const(16)), const(1))
    rounded = builder.lshr(builder.add(builder.add(u, const(0x7FFF)), odd), const(16))
    nan = builder.or_(builder.lshr(u, const(16)), const(0x40))
    is_nan = builder.icmp_unsigned(">", builder.and_(u, const(0x7FFFFFFF)), const(0x7F800000))
    return builder.select(is_nan, nan, rounded)


def _low_16_bits(builder, value, ty):
    return builder.trunc(value, ir.IntType(16)) if ty.bitwidth > 16 else value


@intrinsic
def float16_bits_to_float32(typingctx, h):
    """float16 bits (any integer type; the low 16 bits) as float32: exact."""
    if not isinstance(h, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        return half_bits_to_float32(builder, _low_16_bits(builder, args[0], h), bfloat=False)

    return types.float32(h), codegen


@intrinsic
def bfloat16_bits_to_float32(typingctx, b):
    """bfloat16 bits (any integer type; the low 16 bits) as float32: exact."""
    if not isinstance(b, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        return half_bits_to_float32(builder, _low_16_bits(builder, args[0], b), bfloat=True)

    return types.float32(b), codegen


@intrinsic
def float32_to_float16_bits(typingctx, x):
    """float32 rounded to float16 (nearest even, subnormals, overflow to inf, NaN quiet),
    its bits as an int32 in 0 .. 0xFFFF."""
    if x != types.float32:
        return None

    def codegen(context, builder, sig, args):
        return builder.zext(float32_to_half_bits(builder, args[0], bfloat=False), _I32)

    return types.int32(x), codegen


@intrinsic
def float32_to_bfloat16_bits(typingctx, x):
    """float32 rounded to bfloat16 (nearest even, NaN quiet), its bits as an int32 in
    0 .. 0xFFFF: in 32-bit integer lanes (Numba's own integer arithmetic would widen
    them to 64 bits, half the lanes per instruction)."""
    if x != types.float32:
        return None

    def codegen(context, builder, sig, args):
        u = builder.bitcast(args[0], _I32)
        return _bfloat16_round(builder, u, lambda v: ir.Constant(_I32, v))

    return types.int32(x), codegen


__all__ = [
    "Vec",
    "bfloat16_bits_to_float32",
    "float16_bits_to_float32",
    "float32_to_bfloat16_bits",
    "float32_to_float16_bits",
    "lanes",
    "load_rows",
    "narrow",
    "prefetch",
    "store_rows",
    "transpose",
    "transpose_indices",
    "widen",
    "width",
]
