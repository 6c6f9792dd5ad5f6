"""Real models built on the spot: no weights are downloaded, ever."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


@dataclass(frozen=True)
class Digits:
    path: Path
    samples: np.ndarray  # float32 (n, 64)
    labels: np.ndarray


def digits_classifier(path: Path, seed: int = 0, max_iter: int = 300) -> Digits:
    """Logistic regression on scikit-learn's bundled digits set, as ONNX."""
    from skl2onnx import to_onnx
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    x, y = load_digits(return_X_y=True)
    x = x.astype(np.float32)
    model = LogisticRegression(max_iter=max_iter, random_state=seed).fit(x[:1500], y[:1500])
    onx = to_onnx(model, x[:1], options={id(model): {"zipmap": False}}, target_opset=17)
    path.write_bytes(onx.SerializeToString())
    return Digits(path, x[1500:], y[1500:])


def small_conv(path: Path, seed: int = 0) -> Path:
    """A 2-layer conv net on 1x3x32x32 images, with random weights."""
    rng = np.random.default_rng(seed)
    w1 = numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((16, 8, 3, 3)).astype(np.float32), "w2")
    wf = numpy_helper.from_array(rng.standard_normal((16, 10)).astype(np.float32), "wf")
    nodes = [
        helper.make_node("Conv", ["image", "w1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p1", "w2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("MatMul", ["f", "wf"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "small_conv",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 32, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        initializer=[w1, w2, wf],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    path.write_bytes(model.SerializeToString())
    return path


def dense_of_size(path: Path, megabytes: float, seed: int = 0) -> Path:
    """y = x @ W with W sized so the file is about ``megabytes`` MB."""
    cols = 256
    rows = max(1, int(megabytes * 1024 * 1024 / 4 / cols))
    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array(rng.standard_normal((rows, cols)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "dense",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", rows])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", cols])],
        initializer=[w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path.write_bytes(model.SerializeToString())
    return path


# -- digits as a small MLP, in ONNX and TFLite (variants of one version) --


@dataclass(frozen=True)
class DigitsMlp:
    """A scikit-learn MLP on the digits set (inputs scaled to [0, 1]), exported by hand:
    the same weights as ONNX (MatMul/Add/Relu, logits out) and as TFLite."""

    path: Path
    layers: list[tuple[np.ndarray, np.ndarray]]  # (weights (in, out), bias) per layer
    samples: np.ndarray  # float32 (n, 64), held out
    labels: np.ndarray
    calibration: np.ndarray  # float32 (m, 64) from the training split


def digits_mlp(path: Path, hidden: int = 32, seed: int = 0) -> DigitsMlp:
    from sklearn.datasets import load_digits
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    with warnings.catch_warnings():  # a few hundred steps are enough for these tests
        warnings.simplefilter("ignore", ConvergenceWarning)
        mlp = MLPClassifier(hidden_layer_sizes=(hidden,), max_iter=300, random_state=seed).fit(
            x[:1500], y[:1500]
        )
    layers = [
        (w.astype(np.float32), b.astype(np.float32)) for w, b in zip(mlp.coefs_, mlp.intercepts_, strict=True)
    ]
    nodes, inits, current = [], [], "X"
    for i, (w, b) in enumerate(layers):
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        out = "logits" if i == len(layers) - 1 else f"h{i}"
        nodes.append(helper.make_node("MatMul", [current, f"w{i}"], [f"m{i}"]))
        nodes.append(helper.make_node("Add", [f"m{i}", f"b{i}"], [out if i == len(layers) - 1 else f"a{i}"]))
        if i < len(layers) - 1:
            nodes.append(helper.make_node("Relu", [f"a{i}"], [out]))
        current = out
    graph = helper.make_graph(
        nodes,
        "digits_mlp",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    path.write_bytes(model.SerializeToString())
    return DigitsMlp(path, layers, x[1500:], y[1500:], x[:200])


def _schema() -> Any:
    from tflite_micro.tensorflow.lite.micro.python import schema_py_generated

    return schema_py_generated


def sine_float_tflite() -> Path:
    """The tiny real model the tflite-micro package ships (float, 1 -> 1)."""
    import tflite_micro

    return Path(tflite_micro.__file__).parent / "python" / "tflite_micro" / "sine_float.tflite"


def _quant(s: Any, scale: float, zero: int) -> Any:
    q = s.QuantizationParametersT()
    q.scale, q.zeroPoint = [float(scale)], [int(zero)]
    return q


def _affine(lo: float, hi: float) -> tuple[float, int]:
    """int8 scale and zero point covering [lo, hi] (which always includes 0)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = (hi - lo) / 255 or 1.0
    return scale, int(np.clip(round(-128 - lo / scale), -128, 127))


def tflite_mlp(
    path: Path,
    layers: list[tuple[np.ndarray, np.ndarray]],
    int8: bool = False,
    calibration: np.ndarray | None = None,
    float_io: bool = False,
) -> Path:
    """Fully-connected layers (ReLU between them) as a TFLite flatbuffer, float or int8.

    The int8 model takes and returns int8 tensors (per-tensor scales: weights symmetric,
    activations from the ranges seen on ``calibration``), like a fully-quantized export;
    with ``float_io`` it takes and returns float32 through QUANTIZE and DEQUANTIZE at its
    edges, int8 kernels inside, as the TFLite converter writes by default.
    """
    import flatbuffers

    s = _schema()
    buffers = [s.BufferT()]  # buffer 0 is the empty sentinel

    def buffer(array: np.ndarray | None) -> int:
        b = s.BufferT()
        if array is not None:
            b.data = np.frombuffer(np.ascontiguousarray(array).tobytes(), dtype=np.uint8).tolist()
        buffers.append(b)
        return len(buffers) - 1

    tensors: list[Any] = []

    def tensor(name: str, shape: list[int], ttype: int, data: np.ndarray | None, q: Any = None) -> int:
        t = s.TensorT()
        t.name, t.type, t.shape = name, ttype, [abs(d) for d in shape]
        t.shapeSignature = shape if -1 in shape else None
        t.buffer = buffer(data)
        t.quantization = q
        tensors.append(t)
        return len(tensors) - 1

    ranges: list[tuple[float, int]] = []
    if int8:
        assert calibration is not None, "an int8 model needs calibration samples for its activation ranges"
        act = calibration.astype(np.float32)
        ranges.append(_affine(0.0, 1.0))
        for i, (w, b) in enumerate(layers):
            act = act @ w + b
            if i < len(layers) - 1:
                act = np.maximum(act, 0)
            ranges.append(_affine(float(act.min()), float(act.max())))
    f32, i8, i32 = s.TensorType.FLOAT32, s.TensorType.INT8, s.TensorType.INT32
    in_dim = layers[0][0].shape[0]
    edges = int8 and float_io
    operators = []
    # Operator codes, by index: FULLY_CONNECTED, then QUANTIZE and DEQUANTIZE for float I/O.
    fc_code, quantize_code, dequantize_code = 0, 1, 2

    def op_of(code: int, inputs: list[int], outputs: list[int]) -> Any:
        op = s.OperatorT()
        op.opcodeIndex, op.inputs, op.outputs = code, inputs, outputs
        return op

    if edges:
        first = tensor("input", [-1, in_dim], f32, None)
        current = tensor("input_int8", [-1, in_dim], i8, None, _quant(s, *ranges[0]))
        operators.append(op_of(quantize_code, [first], [current]))
    else:
        current = tensor(
            "input", [-1, in_dim], i8 if int8 else f32, None, _quant(s, *ranges[0]) if int8 else None
        )
        first = current
    for i, (w, b) in enumerate(layers):
        out_dim = w.shape[1]
        if int8:
            in_scale = ranges[i][0]
            w_scale = float(np.abs(w).max()) / 127 or 1.0
            wq = np.clip(np.round(w.T / w_scale), -127, 127).astype(np.int8)
            bq = np.round(b / (in_scale * w_scale)).astype(np.int32)
            wt = tensor(f"w{i}", [out_dim, w.shape[0]], i8, wq, _quant(s, w_scale, 0))
            bt = tensor(f"b{i}", [out_dim], i32, bq, _quant(s, in_scale * w_scale, 0))
            out = tensor(f"fc{i}", [-1, out_dim], i8, None, _quant(s, *ranges[i + 1]))
        else:
            wt = tensor(f"w{i}", [out_dim, w.shape[0]], f32, np.ascontiguousarray(w.T))
            bt = tensor(f"b{i}", [out_dim], f32, b)
            out = tensor(f"fc{i}", [-1, out_dim], f32, None)
        options = s.FullyConnectedOptionsT()
        options.fusedActivationFunction = (
            s.ActivationFunctionType.RELU if i < len(layers) - 1 else s.ActivationFunctionType.NONE
        )
        op = op_of(fc_code, [current, wt, bt], [out])
        op.builtinOptionsType, op.builtinOptions = s.BuiltinOptions.FullyConnectedOptions, options
        operators.append(op)
        current = out
    if edges:
        output = tensor("output", [-1, layers[-1][0].shape[1]], f32, None)
        operators.append(op_of(dequantize_code, [current], [output]))
        current = output
    codes = []
    for builtin, version in (
        (s.BuiltinOperator.FULLY_CONNECTED, 4 if int8 else 1),
        (s.BuiltinOperator.QUANTIZE, 1),
        (s.BuiltinOperator.DEQUANTIZE, 2),
    ):
        code = s.OperatorCodeT()
        code.builtinCode = code.deprecatedBuiltinCode = builtin
        code.version = version
        codes.append(code)
    subgraph = s.SubGraphT()
    subgraph.tensors, subgraph.inputs, subgraph.outputs = tensors, [first], [current]
    subgraph.operators, subgraph.name = operators, "main"
    model = s.ModelT()
    model.version, model.operatorCodes, model.subgraphs = 3, codes if edges else codes[:1], [subgraph]
    model.buffers, model.description = buffers, "edgefleet test model"
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    path.write_bytes(bytes(builder.Output()))
    return path


def wide_conv(path: Path, size: int = 96) -> Path:
    """Three 3x3 convs up to 64 channels on 1x3xSIZExSIZE: ~10 ms a run at 96, so inference dominates."""
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((32, 3, 3, 3)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((64, 32, 3, 3)).astype(np.float32), "w2")
    w3 = numpy_helper.from_array(rng.standard_normal((64, 64, 3, 3)).astype(np.float32), "w3")
    nodes = [
        helper.make_node("Conv", ["image", "w1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("Conv", ["r2", "w3"], ["c3"], pads=[1, 1, 1, 1]),
        helper.make_node("GlobalAveragePool", ["c3"], ["g"]),
        helper.make_node("Flatten", ["g"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "wide_conv",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 64])],
        initializer=[w1, w2, w3],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    path.write_bytes(model.SerializeToString())
    return path


WEIGHTS = {"low": 1.0, "mid": 2.0, "high": 4.0}


def sklearn_mlp(path: Path, hidden: int = 32, seed: int = 0) -> Digits:
    """A scikit-learn MLP classifier on digits, converted with skl2onnx (MatMul/Add/Relu inside)."""
    from skl2onnx import to_onnx
    from sklearn.datasets import load_digits
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    with warnings.catch_warnings():  # a few hundred steps are enough for these tests
        warnings.simplefilter("ignore", ConvergenceWarning)
        model = MLPClassifier(hidden_layer_sizes=(hidden,), max_iter=300, random_state=seed).fit(
            x[:1500], y[:1500]
        )
    onx = to_onnx(model, x[:1], options={id(model): {"zipmap": False}}, target_opset=17)
    path.write_bytes(onx.SerializeToString())
    return Digits(path, x[1500:], y[1500:])


def conv_net(path: Path, width: int = 32, size: int = 64, seed: int = 0) -> Path:
    """A wider 3-layer conv net on 1x3xSIZExSIZE images (He-initialised random weights), for benchmarks."""
    rng = np.random.default_rng(seed)

    def he(shape: tuple[int, ...]) -> np.ndarray:
        fan_in = int(np.prod(shape[1:]))
        return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)

    chans = [3, width, 2 * width, 4 * width]
    inits, nodes, current = [], [], "image"
    for i in range(3):
        inits += [
            numpy_helper.from_array(he((chans[i + 1], chans[i], 3, 3)), f"w{i}"),
            numpy_helper.from_array(np.zeros(chans[i + 1], np.float32), f"b{i}"),
        ]
        nodes += [
            helper.make_node("Conv", [current, f"w{i}", f"b{i}"], [f"c{i}"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", [f"c{i}"], [f"r{i}"]),
            helper.make_node("MaxPool", [f"r{i}"], [f"p{i}"], kernel_shape=[2, 2], strides=[2, 2]),
        ]
        current = f"p{i}"
    inits.append(numpy_helper.from_array(he((10, chans[3])).T.copy(), "wf"))
    nodes += [
        helper.make_node("GlobalAveragePool", [current], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("MatMul", ["f", "wf"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "conv_net",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    path.write_bytes(model.SerializeToString())
    return path


# -- hostile models: small files that expand when loaded, big files that fail late --


def expanding_onnx(path: Path, elements: int, hidden: bool = False) -> Path:
    """A file of a few hundred bytes whose ConstantOfShape is folded into ``elements`` floats
    when a runtime loads it. ``hidden``: the shape passes through Abs first, so ONNX shape
    inference cannot size the expansion (only loading it shows how big it is)."""
    shape = numpy_helper.from_array(np.array([elements], dtype=np.int64))
    nodes = [helper.make_node("Constant", [], ["shape"], value=shape)]
    if hidden:
        nodes.append(helper.make_node("Abs", ["shape"], ["dims"]))
    fill = helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])
    nodes += [
        helper.make_node("ConstantOfShape", ["dims" if hidden else "shape"], ["big"], value=fill),
        helper.make_node("Add", ["x", "big"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "expanding",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path.write_bytes(model.SerializeToString())
    return path


def scores_beside_features(
    path: Path, seed: int = 0, features_seed: int | None = None, scores_first: bool = True
) -> Path:
    """x: float32[N, 4] -> logits[N, 3] (class scores), features[N, 8] (an embedding). With the
    scores first, the last output of two or more columns is not the one that classifies; with
    them last, the first is not. ``features_seed`` draws other features beside the same scores."""
    rng = np.random.default_rng(seed)
    w_logits = rng.normal(size=(4, 3)).astype(np.float32)
    w_features = rng.normal(size=(4, 8)).astype(np.float32)
    if features_seed is not None:
        w_features = np.random.default_rng(features_seed).normal(size=(4, 8)).astype(np.float32)
    outputs = [
        helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3]),
        helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", 8]),
    ]
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w_logits"], ["logits"]),
            helper.make_node("MatMul", ["x", "w_features"], ["features"]),
        ],
        "scores_beside_features",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        outputs if scores_first else outputs[::-1],
        [numpy_helper.from_array(w_logits, "w_logits"), numpy_helper.from_array(w_features, "w_features")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.write_bytes(model.SerializeToString())
    return path


def signature_of(path: Path) -> Any:
    """The signature the controller infers for a model file and sends with its assignments
    (a ``fleet_pb2.ModelSignature``)."""
    from controller.inspection import inspect_artifact
    from controller.signature import infer_signature

    found = inspect_artifact(path).signature
    return infer_signature(found.inputs, found.outputs).to_proto()


def big_onnx_failing_late(path: Path, megabytes: int) -> Path:
    """``megabytes`` MB of weights followed by a node reading a tensor nothing produces:
    a checker must read the whole file before it can refuse it."""
    w = numpy_helper.from_array(np.zeros((megabytes * 1024 * 1024 // 4,), dtype=np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["s"]), helper.make_node("Mul", ["s", "nowhere"], ["y"])],
        "late",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None])],
        initializer=[w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path.write_bytes(model.SerializeToString())
    return path
