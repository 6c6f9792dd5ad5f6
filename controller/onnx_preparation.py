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
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
from onnxruntime.quantization.shape_inference import quant_pre_process

log = logging.getLogger(__name__)

_DEFAULT_DOMAINS = ("", "ai.onnx")
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
    for skip_symbolic in (False, True) if pre_process else ():
        try:
            quant_pre_process(str(target), str(target), skip_symbolic_shape=skip_symbolic)
        except Exception as exc:  # the shape inferers raise whatever their passes raise
            reason = _first_line(exc)
            done["pre_processing"] = f"failed: {reason}"
            log.info("quantization pre-processing failed skip_symbolic=%s reason=%s", skip_symbolic, reason)
            onnx.save(model, str(target))
            continue
        done["pre_processing"] = "without symbolic shapes" if skip_symbolic else "done"
        break
    return done


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__
