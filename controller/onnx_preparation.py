"""Real ONNX exports made ready for onnxruntime.quantization and the fp16 converter.

Exporters write graphs those tools do not expect:

- weights as ``Constant`` nodes rather than initializers (Paddle, some PyTorch
  exports): the quantizer and the fp16 converter look only at initializers, so
  such weights stay float;
- the default domain listed twice in ``opset_import`` (``""`` and ``"ai.onnx"``, or
  ``""`` twice, as skl2onnx writes): the quantizer stops with "Failed to find
  proper ai.onnx domain";
- an opset below 13, where DequantizeLinear has no ``axis``: per-channel int8
  weights cannot be written (Paddle exports are opset 11 or 12);
- no shapes for intermediate tensors: onnxruntime's quantization pre-processing
  (symbolic shape inference, graph optimization, ONNX shape inference) is what its
  authors ask for before quantizing, and without it many operators stay float.

The pre-processing runs in a child process in a folder of its own: when symbolic
shape inference gives up it writes ``sym_shape_infer_temp.onnx`` and a
``<uuid>.data`` file into the current directory (the controller's), and a
pass that hangs or crashes on a hostile file must not take the controller along.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
from onnxruntime.quantization.shape_inference import quant_pre_process

log = logging.getLogger(__name__)

_DEFAULT_DOMAINS = ("", "ai.onnx")
PRE_PROCESS_TIMEOUT_S = 600
# The first opset whose QuantizeLinear/DequantizeLinear take an ``axis`` (per-channel weights).
PER_CHANNEL_OPSET = 13
# Constant attributes other than a tensor, and the dtype their value becomes.
_SCALAR_ATTRS = {
    "value_float": np.float32,
    "value_floats": np.float32,
    "value_int": np.int64,
    "value_ints": np.int64,
}


def normalise_opsets(model: onnx.ModelProto) -> bool:
    """One entry per domain, the default domain spelled ``""``, at the highest version listed."""
    versions: dict[str, int] = {}
    for entry in model.opset_import:
        domain = "" if entry.domain in _DEFAULT_DOMAINS else entry.domain
        versions[domain] = max(versions.get(domain, 0), entry.version)
    if len(versions) == len(model.opset_import) and all(e.domain != "ai.onnx" for e in model.opset_import):
        return False
    del model.opset_import[:]
    model.opset_import.extend(onnx.helper.make_opsetid(d, v) for d, v in versions.items())
    return True


def constants_to_initializers(graph: onnx.GraphProto) -> int:
    """Move the main graph's ``Constant`` nodes into initializers; returns how many moved.

    Subgraphs (If/Loop bodies) are left alone: their constants are not weights the
    quantizer could reach anyway, and moving them would change what they capture.
    """
    kept: list[onnx.NodeProto] = []
    moved = 0
    for node in graph.node:
        tensor = (
            _constant_tensor(node) if node.op_type == "Constant" and node.domain in _DEFAULT_DOMAINS else None
        )
        if tensor is None:
            kept.append(node)
            continue
        tensor.name = node.output[0]
        graph.initializer.append(tensor)
        moved += 1
    if moved:
        del graph.node[:]
        graph.node.extend(kept)
    return moved


def _constant_tensor(node: onnx.NodeProto) -> onnx.TensorProto | None:
    for attr in node.attribute:
        if attr.name == "value" and attr.HasField("t"):
            tensor = onnx.TensorProto()
            tensor.CopyFrom(attr.t)
            return tensor
        if attr.name in _SCALAR_ATTRS:
            value = onnx.helper.get_attribute_value(attr)
            return numpy_helper.from_array(np.asarray(value, dtype=_SCALAR_ATTRS[attr.name]))
    return None  # sparse_value, value_string(s): not weights


def prepare(source: Path, target: Path, pre_process: bool = True) -> dict[str, object]:
    """Write ``source`` ready for quantization to ``target``; returns what was done, for the report.

    ``pre_process``: also run onnxruntime's quantization pre-processing (for int8; the
    fp16 converter needs only the graph fixes).

    Pre-processing that fails (symbolic shape inference gives up on some control flow)
    is retried without symbolic shapes, then skipped with its reason in the report:
    quantizing without it is worse, not wrong.
    """
    model = onnx.load(str(source))
    done: dict[str, object] = {}
    if normalise_opsets(model):
        done["opsets_normalised"] = True
    moved = constants_to_initializers(model.graph)
    if moved:
        done["constants_to_initializers"] = moved
    opset = next((e.version for e in model.opset_import if e.domain == ""), PER_CHANNEL_OPSET)
    if pre_process and opset < PER_CHANNEL_OPSET:
        try:
            model = onnx.version_converter.convert_version(model, PER_CHANNEL_OPSET)
            done["opset_upgraded"] = f"{opset} -> {PER_CHANNEL_OPSET}"
        except Exception as exc:  # the converter has no adapter for some operators; per-tensor still works
            done["opset_upgraded"] = f"failed: {_first_line(exc)}"
    onnx.save(model, str(target))
    if pre_process:
        done["pre_processing"] = _pre_process(target)
        log.info("quantization pre-processing source=%s result=%s", source.name, done["pre_processing"])
    return done


def _pre_process(path: Path) -> str:
    """onnxruntime's quantization pre-processing of ``path`` in place, in a child process:
    with symbolic shape inference, else without it. Returns how it went ("done", "without
    symbolic shapes" or "failed: reason"); on failure ``path`` is unchanged."""
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".pre-process-") as tmp:
        output = Path(tmp) / "pre-processed.onnx"
        command = [sys.executable, "-m", __name__, str(path), str(output)]
        try:
            done = subprocess.run(
                command, cwd=tmp, capture_output=True, text=True, timeout=PRE_PROCESS_TIMEOUT_S
            )
        except subprocess.TimeoutExpired:
            return f"failed: took longer than {PRE_PROCESS_TIMEOUT_S} s"
        result = done.stdout.strip().splitlines()[-1:] if done.returncode == 0 else []
        if not result or not output.is_file():
            lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
            return "failed: " + (lines[-1] if lines else f"exit status {done.returncode}")[:300]
        output.replace(path)
        return result[0]


def main(argv: list[str] | None = None) -> int:
    """``python -m controller.onnx_preparation SOURCE TARGET``: the child; prints how it went."""
    source, target = sys.argv[1:3] if argv is None else argv[:2]
    try:
        quant_pre_process(source, target)
        print("done")
    except Exception as exc:  # symbolic shape inference gives up on some control flow
        log.info("symbolic shape inference failed reason=%s", _first_line(exc))
        quant_pre_process(source, target, skip_symbolic_shape=True)
        print("without symbolic shapes")
    return 0


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())
