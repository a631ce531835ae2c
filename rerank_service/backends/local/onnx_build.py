"""Build ONNX graphs for onnx_engine.py, run as a child process of the server.

    python -m rerank_service.backends.local.onnx_build export MODEL_DIR OUTPUT TARGET
    python -m rerank_service.backends.local.onnx_build quantize SOURCE TARGET

`export` writes the float32 graph of a cross-encoder (OUTPUT `logits`) or a bi-encoder
(`last_hidden_state`) with a dynamic batch and length; `quantize` writes the int8 graph
of a float32 one. On failure the last line on stderr says why, and the exit code is 1.
"""

from __future__ import annotations

import os
import sys
import threading
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

# torch, transformers and what imports them (seconds) are imported where they are used: a
# child follows its server (end_with_parent) before, and ends at once with it.
if TYPE_CHECKING:
    import torch

    from rerank_service.backends.local.common import Output

# The variable that names the pipe whose end a build child watches (end_with_parent): the
# same as onnx_engine.PARENT_PIPE, not imported from it (it imports torch).
PARENT_PIPE = "RERANK_ONNX_BUILD_PARENT_PIPE"
# The exit code of a build whose server ended before it did.
PARENT_GONE = 3


def export(path: Path, output: Output, target: Path) -> None:
    import torch

    from rerank_service.backends.local.common import accepts_argument, for_inference
    from rerank_service.backends.local.forward import model_class
    from rerank_service.backends.local.onnx_engine import INPUTS

    model = for_inference(
        # Eager attention (matmul, softmax, matmul): ONNX Runtime fuses and quantizes it; the
        # SDPA path exports with NaN guards (IsNaN, Where) on every attention matrix that
        # cost about a tenth of an int8 forward pass.
        model_class(output).from_pretrained(
            path, dtype=torch.float32, local_files_only=True, attn_implementation="eager"
        ),
        "cpu",
    )
    token_types = accepts_argument(model, "token_type_ids")
    names = list(INPUTS if token_types else INPUTS[:2])
    # Padding in the example keeps the mask an input of the graph, never a constant; the
    # ids are small enough for any vocabulary.
    ids = torch.tensor([[1, 5, 6, 7, 2, 0], [1, 8, 2, 0, 0, 0]], dtype=torch.long)
    example = (ids, (ids != 0).long(), torch.zeros_like(ids))[: len(names)]
    batch, length = torch.export.Dim("batch"), torch.export.Dim("length")
    # The torch.export-based exporter: the TorchScript one bakes the attention mask of its
    # example batch into the graph (scores off by up to 1.6 on padded batches).
    program = torch.onnx.export(
        _graph(model, output),
        example,
        dynamo=True,
        input_names=names,
        output_names=[output],
        dynamic_shapes=tuple({0: batch, 1: length} for _ in names),
        verbose=False,
    )
    if program is None:
        raise RuntimeError("torch.onnx.export returned no program")
    program.save(str(target))


def _graph(model: torch.nn.Module, output: Output) -> torch.nn.Module:
    """The model with positional inputs and the one output the scorer reads."""
    import torch

    class Graph(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(
            self,
            input_ids: torch.Tensor,
            attention_mask: torch.Tensor,
            token_type_ids: torch.Tensor | None = None,
        ) -> torch.Tensor:
            inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
            if token_type_ids is not None:
                inputs["token_type_ids"] = token_type_ids
            result: torch.Tensor = getattr(self.model(**inputs), output)
            return result

    return Graph()


def quantize(source: Path, target: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # Dynamic int8: weights of MatMul and friends quantized ahead, activations on the fly.
    # Per channel (one scale per output row) keeps the ranking: Spearman 0.99 against
    # float32 on the bundled model, where one scale per tensor gave 0.98.
    quantize_dynamic(source, target, weight_type=QuantType.QInt8, per_channel=True)


def end_with_parent() -> None:
    """End this process as soon as the server that started it has ended: the server holds the
    write end of the pipe PARENT_PIPE names, which reads EOF once nothing holds it."""
    watched = os.environ.get(PARENT_PIPE, "")
    if not watched.isdigit():
        return  # run by hand: nobody to follow

    def watch() -> None:
        with open(int(watched), "rb") as pipe:
            pipe.read()  # nothing is ever written: returns once the server is gone
        os._exit(PARENT_GONE)  # whatever the main thread is in (an export takes minutes)

    threading.Thread(target=watch, name="parent watch", daemon=True).start()


def main(arguments: list[str]) -> int:
    end_with_parent()
    warnings.simplefilter("ignore")
    try:
        if arguments[:1] == ["export"] and len(arguments) == 4:
            output: Output = "logits" if arguments[2] == "logits" else "last_hidden_state"
            export(Path(arguments[1]), output, Path(arguments[3]))
        elif arguments[:1] == ["quantize"] and len(arguments) == 3:
            quantize(Path(arguments[1]), Path(arguments[2]))
        else:
            print(__doc__, file=sys.stderr)
            return 2
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"{type(exc).__name__}: {reason}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
