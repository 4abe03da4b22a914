"""ONNX Runtime backend for the predictor (CPU): the artifact's encoder and every head exported to
one ONNX graph with ONNX Runtime's transformer fusions, fp32 or dynamic int8, cached beside the artifact (or in a temporary folder when the
artifact is read-only). Needs ``pip install 'mtl-ray[onnx]'`` (onnx, onnxruntime, onnxscript).

    Predictor.load("runs/quick/model", backend="onnx")                  # fp32
    Predictor.load("runs/quick/model", backend="onnx", quantize=True)   # dynamic int8

The graph takes ``input_ids`` and ``attention_mask`` ([batch, tokens], both dynamic) and returns
one output per task, named after it, with the torch model's shapes. :class:`OnnxModel` is called
like ``MultiTaskModel(ids, mask, names)``, so the predictor, its length buckets and the task kinds'
decoding are the same for both backends.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mtl.model import MultiTaskModel

ONNX_DIR = "onnx"
OPSET = 18
GRAPH_FORMAT = "fused-1"  # part of the cache key: a graph cached by an older mtl-ray is not reused
log = logging.getLogger(__name__)


def require_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as e:
        raise ImportError("backend 'onnx' needs onnx and onnxruntime: pip install 'mtl-ray[onnx]' "
                          "(or pip install onnx onnxruntime onnxscript)") from e


class _AllHeads(nn.Module):
    def __init__(self, model: MultiTaskModel):
        super().__init__()
        self.model = model
        self.names = list(model.tasks)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        out = self.model(input_ids, attention_mask, self.names)
        return tuple(out[n] for n in self.names)


def export(model: MultiTaskModel, path: Path, fuse: bool = True) -> Path:
    """``model`` (all heads) as an fp32 ONNX graph at ``path``. ``fuse``: with ONNX Runtime's
    transformer fusions (one ``Attention`` op per layer, ``EmbedLayerNormalization``,
    ``SkipLayerNormalization``, ``BiasGelu``), falling back to the plain graph where they do not
    apply (an encoder the fusions do not know, an exporter that cannot trace it)."""
    require_onnx()
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.to("cpu").eval()
    if fuse:
        try:
            return _export_fused(model, path)
        except Exception as e:  # noqa: BLE001 - an optimisation: the plain graph gives the same answers
            log.warning("ONNX fusions not applied (%s: %s); exporting the plain graph", type(e).__name__, e)
    ids = torch.full((2, 8), 1000, dtype=torch.long)
    mask = torch.ones_like(ids)
    batch, tokens = torch.export.Dim("batch", min=1), torch.export.Dim("tokens", min=2, max=4096)
    with torch.no_grad():
        torch.onnx.export(_AllHeads(model).eval(), (ids, mask), str(path), input_names=["input_ids", "attention_mask"],
                          output_names=list(model.tasks), opset_version=OPSET, dynamo=True, verbose=False,
                          dynamic_shapes={"input_ids": {0: batch, 1: tokens}, "attention_mask": {0: batch, 1: tokens}})
    return path


def _export_fused(model: MultiTaskModel, path: Path) -> Path:
    """Traced with eager attention (the pattern ONNX Runtime's BERT fusions match: the dynamo
    exporter's and SDPA's attention graphs are left unfused), then optimised offline."""
    import onnx
    from onnxruntime.transformers.optimizer import optimize_model

    encoder = model.encoder
    config = encoder.config
    before = config._attn_implementation
    raw = path.with_name(path.name + ".raw")
    encoder.set_attn_implementation("eager")
    try:
        ids = torch.full((2, 8), 1000, dtype=torch.long)
        axes = {0: "batch", 1: "tokens"}
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
            torch.onnx.export(_AllHeads(model).eval(), (ids, torch.ones_like(ids)), str(raw),
                              input_names=["input_ids", "attention_mask"], output_names=list(model.tasks),
                              opset_version=17, dynamo=False,
                              dynamic_axes={"input_ids": axes, "attention_mask": axes})
        optimized = optimize_model(str(raw), model_type="bert", num_heads=config.num_attention_heads,
                                   hidden_size=config.hidden_size)
        stats = optimized.get_fused_operator_statistics()
        if not stats.get("Attention"):
            raise RuntimeError(f"no attention fused ({stats})")
        onnx.save(optimized.model, str(path))
        return path
    finally:
        encoder.set_attn_implementation(before)
        raw.unlink(missing_ok=True)


def quantize_int8(fp32: Path, int8: Path) -> Path:
    """Dynamic int8 quantization of the graph's weights (activations quantized at run time)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # fused ops (com.microsoft domain) defeat shape inference: their outputs are float
    quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8,
                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    return int8


def _fingerprint(artifact: Path) -> str:
    """Changes when the artifact's weights or manifest change (size and modification time)."""
    h = hashlib.sha256(GRAPH_FORMAT.encode())
    for f in sorted(p for p in artifact.rglob("*") if p.is_file() and ONNX_DIR not in p.relative_to(artifact).parts):
        st = f.stat()
        h.update(f"{f.relative_to(artifact)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def cached_graph(artifact: Path, model: MultiTaskModel, int8: bool) -> Path:
    """The artifact's ONNX graph (exported, and quantized, on first use), under ``<artifact>/onnx/``
    when that is writable, else in the temporary folder; keyed by the artifact's fingerprint."""
    key = _fingerprint(artifact)
    folder = artifact / ONNX_DIR
    try:
        folder.mkdir(exist_ok=True)
        probe = folder / ".write-test"
        probe.touch()
        probe.unlink()
    except OSError:
        folder = Path(tempfile.gettempdir()) / "mtl-ray-onnx" / key
    fp32, q8 = folder / f"{key}.fp32.onnx", folder / f"{key}.int8.onnx"
    if not fp32.exists():
        tmp = folder / f".{key}.{os.getpid()}.fp32.onnx"
        export(model, tmp)
        os.replace(tmp, fp32)  # atomic: a concurrent replica sees the whole file or none
    if not int8:
        return fp32
    if not q8.exists():
        tmp = folder / f".{key}.{os.getpid()}.int8.onnx"
        quantize_int8(fp32, tmp)
        os.replace(tmp, q8)
    return q8


class OnnxModel:
    """An ONNX Runtime session behind ``MultiTaskModel``'s call: ``model(ids, mask, names)`` ->
    ``{name: logits}`` (torch tensors, CPU). ``threads``: intra-op threads (default: torch's)."""

    def __init__(self, graph: Path, tasks: dict[str, Any], kinds: dict[str, Any], threads: int | None = None):
        require_onnx()
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
        self.graph = graph
        self.tasks, self.kinds = tasks, kinds

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, names: list[str]):
        feeds = {"input_ids": input_ids.cpu().numpy(), "attention_mask": attention_mask.cpu().numpy()}
        return dict(zip(names, (torch.from_numpy(o) for o in self.session.run(list(names), feeds))))

    def parameters(self):  # the predictor reads the device from the first parameter
        yield torch.empty(0)

    def to(self, device) -> OnnxModel:
        if torch.device(device).type != "cpu":
            raise ValueError("backend 'onnx' runs on CPU (use backend 'torch' on GPUs)")
        return self

    def eval(self) -> OnnxModel:
        return self


def load_onnx(artifact: Path, model: MultiTaskModel, int8: bool = False, threads: int | None = None) -> OnnxModel:
    """The ONNX Runtime twin of ``model`` (loaded from ``artifact``), exported on first use."""
    return OnnxModel(cached_graph(Path(artifact), model, int8), model.tasks, model.kinds, threads)
