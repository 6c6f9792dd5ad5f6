"""Checking an uploaded model file in a child process, never in the controller.

Loading a model to check it holds the whole file (and whatever it expands to) in
memory, and a runtime may crash on a hostile file. So the controller hands the
file's path to a checker process, forked from a server that already has onnx,
onnxruntime and LiteRT imported (a check starts in milliseconds). The checker
limits its own data segment to ``max_model_memory_bytes`` beyond what it held when
it started, estimates what loading the model takes (:mod:`controller.model_memory`)
and only then inspects it the way a device loads it (:mod:`controller.inspection`).
The controller's memory does not grow with the upload; a model that crashes the
runtime or runs it out of memory ends the checker, and the upload is refused.
"""

from __future__ import annotations

import multiprocessing
import os
import resource
import signal
import threading
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from controller.errors import InvalidModel
from controller.inspection import Inspected, inspect_artifact
from controller.model_memory import check_onnx, check_tflite, human
from controller.model_runner import Runner, file_format
from controller.tflite import interpreter_module, is_tflite

CHECK_TIMEOUT_S = 600.0
_ONE_AT_A_TIME = threading.Lock()
# Shared with variant production (controller.optimize), which forks its producers from the same server.
process_context = multiprocessing.get_context("forkserver")
process_context.set_forkserver_preload([__name__])
_NUMPY_TYPES = {
    "float": np.float32,
    "double": np.float64,
    "float16": np.float16,
    "int8": np.int8,
    "int16": np.int16,
    "int32": np.int32,
    "int64": np.int64,
    "uint8": np.uint8,
    "uint16": np.uint16,
    "uint32": np.uint32,
    "uint64": np.uint64,
    "bool": np.bool_,
}
# Texts runtimes use when an allocation fails under the limit.
OUT_OF_MEMORY = (
    "Arena alloc failed",
    "bad_alloc",
    "bad allocation",
    "Failed to allocate",
    "MemoryError",
    "Cannot allocate memory",
)


def check_artifact(path: Path, memory_limit: int, timeout_s: float = CHECK_TIMEOUT_S) -> Inspected:
    """Inspect ``path`` in a checker process; raise InvalidModel with the reason it was refused."""
    value = _in_checker(_check_in_child, (str(path), memory_limit), memory_limit, timeout_s, "loading")
    assert isinstance(value, Inspected)
    return value


def check_runs(
    path: Path, sample: Path, order: list[str], memory_limit: int, timeout_s: float = CHECK_TIMEOUT_S
) -> None:
    """Run the model at ``path`` once on the inputs in the .npz at ``sample`` (one sample, the
    model's inputs named, fed in ``order``) in a checker process; raise InvalidModel with the
    runtime's own reason when it does not run."""
    _in_checker(
        _run_in_child, (str(path), str(sample), order, memory_limit), memory_limit, timeout_s, "running"
    )


def _in_checker(target: Any, args: tuple[Any, ...], memory_limit: int, timeout_s: float, doing: str) -> Any:
    # One checker at a time: however many uploads arrive together, checkers hold at most
    # one model's memory bound.
    with _ONE_AT_A_TIME:
        return run_checker(target, args, memory_limit, timeout_s, doing)


def run_checker(target: Any, args: tuple[Any, ...], memory_limit: int, timeout_s: float, doing: str) -> Any:
    """Run ``target(*args, conn)`` in a checker process and return the value it sends as
    ``("ok", value)``; InvalidModel with the reason for ``("invalid", text)``, for running out
    of memory (``("memory", None)``, or an allocation failure's text) and for a death. The
    target limits its own memory (:func:`limit_data_segment`)."""
    receiver, sender = process_context.Pipe(duplex=False)
    proc = process_context.Process(target=target, args=(*args, sender), name="model-check", daemon=True)
    proc.start()
    sender.close()
    try:
        if not receiver.poll(timeout_s):
            raise InvalidModel(f"{doing} the model took longer than {timeout_s:.0f} s")
        try:
            kind, value = receiver.recv()
        except EOFError:
            kind, value = "died", None
    finally:
        receiver.close()
        proc.join(5)
        if proc.is_alive():
            proc.kill()
            proc.join()
    if kind == "ok":
        return value
    if kind == "invalid" and not any(text in str(value) for text in OUT_OF_MEMORY):
        raise InvalidModel(str(value))
    if kind == "died" and proc.exitcode is not None and proc.exitcode < 0:
        how = f"was killed by {signal.Signals(-proc.exitcode).name}"
    elif kind == "died":
        how = f"exited with status {proc.exitcode}"
    else:
        how = "ran out of memory"
    raise InvalidModel(
        f"the model checker {how} while {doing} the model: it needs more than the "
        f"{human(memory_limit)} a model may take in memory (max_model_memory_bytes), "
        "or the runtime crashed on it"
    )


def _run_in_child(path: str, sample: str, order: list[str], memory_limit: int, conn: Connection) -> None:
    limit_data_segment(memory_limit + 2 * (os.path.getsize(path) + os.path.getsize(sample)))
    try:
        with np.load(sample, allow_pickle=False) as npz:
            feeds = [npz[name] for name in order]
        try:
            Runner(Path(path), file_format(Path(path))).run(feeds)
        # onnxruntime and LiteRT raise their own types; the text is the operator's reason.
        except Exception as exc:
            first = (str(exc).strip() or type(exc).__name__)[:2000]
            conn.send(("invalid", f"the model does not run on its sample inputs: {first}"))
            return
        conn.send(("ok", None))
    except MemoryError:
        conn.send(("memory", None))
    finally:
        conn.close()


def _check_in_child(path: str, memory_limit: int, conn: Connection) -> None:
    # Besides what the model takes once loaded, the checker holds the file's bytes and
    # their parsed form while it estimates that.
    limit_data_segment(memory_limit + 2 * os.path.getsize(path))
    try:
        conn.send(("ok", _check(Path(path), memory_limit)))
    except InvalidModel as exc:
        conn.send(("invalid", str(exc)))
    except MemoryError:
        conn.send(("memory", None))
    finally:
        conn.close()


def _check(path: Path, memory_limit: int) -> Inspected:
    with path.open("rb") as f:
        head = f.read(8)
    if is_tflite(head):
        module, _, _ = interpreter_module()
        check_tflite(path, memory_limit, module.Interpreter)
        return inspect_artifact(path)
    check_onnx(path, memory_limit)
    inspected = inspect_artifact(path)
    _run_once(path, memory_limit)
    return inspected


def _run_once(path: Path, memory_limit: int) -> None:
    """One inference on zeros, so that what the model allocates when it runs (onnxruntime
    skips folding a constant it cannot allocate, and builds it at the first run instead)
    counts against the limit too. Only running out of memory refuses the model: zeros may
    be meaningless input for it, and the inspection already showed that it loads."""
    options = ort.SessionOptions()
    # Only fatal messages: an out-of-memory failure here is an expected outcome, reported below.
    options.log_severity_level = 4
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    feeds: dict[str, np.ndarray[Any, Any]] = {}
    for arg in session.get_inputs():
        element = str(arg.type).removeprefix("tensor(").removesuffix(")")
        if element not in _NUMPY_TYPES:
            return
        shape = [d if isinstance(d, int) and d > 0 else 1 for d in (arg.shape or [])]
        feeds[arg.name] = np.zeros(shape, dtype=_NUMPY_TYPES[element])
    try:
        session.run(None, feeds)
    except Exception as exc:  # onnxruntime's errors share no public base class
        if any(text in str(exc) for text in OUT_OF_MEMORY):
            raise InvalidModel(
                f"running the model once on zeros needs more than the {human(memory_limit)} a model "
                "may take in memory (max_model_memory_bytes)"
            ) from None


def limit_data_segment(allowed: int) -> None:
    """RLIMIT_DATA counts the heap and private writable mappings (what weights and arenas
    use) but not reserved address space, which runtimes' thread pools take plenty of."""
    held = _data_segment_bytes()
    resource.setrlimit(resource.RLIMIT_DATA, (held + allowed, held + allowed))


def _data_segment_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmData:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/self/status has no VmData line")
