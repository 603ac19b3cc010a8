"""After os.fork() the child works: a plain fork after kernels ran, multiprocessing pools of
every start method, and a fork while another thread is inside a call (holding the launch
lock), with fastsce's threading layer and with GNU OpenMP's.

Each scenario runs in a fresh interpreter with a timeout, so a hang fails the test instead
of hanging the run.
"""

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 600  # a cold kernel cache compiles for minutes on a busy machine

SCRIPT = textwrap.dedent(
    """
    import multiprocessing as mp
    import os
    import sys
    import threading

    import numpy as np

    import fastsce
    from fastsce import _threads

    # (N, K, seed): a small problem (the serial path) and one big enough for the thread pool
    SMALL, BIG = (20, 1000, 1), (400, 1000, 2)

    def work(args):
        n, k, seed = args
        rng = np.random.default_rng(seed)
        z = rng.standard_normal((n, k)).astype(np.float32)
        y = rng.integers(0, k, n)
        loss, g = fastsce.cross_entropy_with_grad(z, y)
        return float(loss), g.tobytes(), float(fastsce.logsumexp(z).sum())

    def check_child(expected, args):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = 0 if [work(a) for a in args] == expected else 3
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, f"child exit {os.waitstatus_to_exitcode(status)}"

    def main(scenario):
        args = [SMALL, BIG]
        expected = [work(a) for a in args]  # the kernels (and the thread pool) ran here first
        if scenario == "fork":
            check_child(expected, args)
        elif scenario.startswith("pool-"):
            with mp.get_context(scenario[5:]).Pool(2) as pool:
                assert pool.map(work, args * 2) == expected * 2
        elif scenario == "fork-during-call":
            held = []
            os.register_at_fork(before=lambda: held.append(_threads._lock.locked()))
            stop = threading.Event()

            def busy():
                while not stop.is_set():
                    work((2000, 1000, 3))

            thread = threading.Thread(target=busy)
            thread.start()
            try:
                while not any(held):  # until a fork lands while the other thread holds the lock
                    while not _threads._lock.locked():
                        pass
                    check_child(expected, args)
                    assert len(held) < 50, "no fork landed inside a call"
            finally:
                stop.set()
                thread.join()
        print("layer", __import__("numba").threading_layer(), "serial_only", _threads.serial_only())

    if __name__ == "__main__":
        main(sys.argv[1])
    """
)

SCENARIOS = ["fork", "pool-fork", "pool-spawn", "pool-forkserver", "fork-during-call"]


def run(tmp_path, scenario, layer):
    script = tmp_path / "scenario.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("NUMBA_THREADING_LAYER", None)
    if layer is not None:
        env["NUMBA_THREADING_LAYER"] = layer
    returncode, out, err = run_in_own_group([sys.executable, str(script), scenario], env)
    assert returncode == 0, out + err
    return out


def run_in_own_group(argv, env):
    """(returncode, stdout, stderr); on timeout the whole process group is killed, so a
    forked child stuck in a hang does not outlive the test."""
    proc = subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"timed out after {TIMEOUT_S} s (a hang):\n{out}{err}")
    return proc.returncode, out, err


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_child_works_with_the_default_layer(tmp_path, scenario):
    out = run(tmp_path, scenario, None)
    assert "layer omp" in out  # the layer fastsce asks for first when nobody chose one


@pytest.mark.parametrize("scenario", ["fork", "pool-fork", "fork-during-call"])
def test_child_works_after_gnu_openmp(tmp_path, scenario):
    """GNU OpenMP kills a forked child on its first parallel region: the child runs serially."""
    pytest.importorskip("numba.np.ufunc.omppool")
    out = run(tmp_path, scenario, "omp")
    assert "layer omp" in out


@pytest.mark.parametrize("scenario", ["fork", "pool-fork", "fork-during-call"])
def test_child_works_with_workqueue(tmp_path, scenario):
    """The layer to choose on a shared machine: the child starts a pool of its own."""
    out = run(tmp_path, scenario, "workqueue")
    assert "layer workqueue" in out


def test_the_users_layer_is_kept(tmp_path):
    script = tmp_path / "layer.py"
    script.write_text(
        "import numba\nnumba.config.THREADING_LAYER = 'omp'\nimport fastsce, numpy as np\n"
        "fastsce.cross_entropy(np.zeros((400, 1000), np.float32), np.zeros(400, np.int64))\n"
        "print(numba.threading_layer())\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("NUMBA_THREADING_LAYER", None)
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["omp"]
