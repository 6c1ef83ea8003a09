"""Small models for the CPU suite, each built fresh from a seed: ``build(name) -> Case``.

Every case is tiny (a second or two to capture) but keeps what makes its family hard: dropout
(GPT-2, BERT), BatchNorm statistics (ResNets, DenseNets, MLP), rotary attention (Llama), dense
concatenations (DenseNet), nested outputs and keyword arguments, views and in-place updates.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch
import torch.nn as nn

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@dataclass
class Case:
    model: nn.Module
    args: tuple
    kwargs: dict = field(default_factory=dict)
    random: bool = False  # draws from the RNG in training (dropout)


def load_example(stem: str):
    spec = importlib.util.spec_from_file_location(f"memplan_example_{stem}", EXAMPLES / f"{stem}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tokens(batch: int, length: int, vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length))


def gpt2() -> Case:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=64,
                                     resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1, use_cache=False)
    config._attn_implementation = "eager"
    model = transformers.GPT2LMHeadModel(config)
    return Case(model, (_tokens(8, 64, 128),), {"return_dict": False}, random=True)


def bert() -> Case:
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                     intermediate_size=128, vocab_size=128,
                                     max_position_embeddings=64, hidden_dropout_prob=0.1,
                                     attention_probs_dropout_prob=0.1)
    config._attn_implementation = "eager"
    model = transformers.BertModel(config)
    ids = _tokens(8, 64, 128)
    return Case(model, (ids,), {"attention_mask": torch.ones_like(ids), "return_dict": False},
                random=True)


def llama() -> Case:
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=128, vocab_size=128,
                                      max_position_embeddings=64, use_cache=False)
    config._attn_implementation = "eager"
    model = transformers.LlamaForCausalLM(config)
    return Case(model, (_tokens(8, 64, 128),), {"return_dict": False})


def resnet18() -> Case:
    torchvision = pytest.importorskip("torchvision")
    return Case(torchvision.models.resnet18(num_classes=10), (torch.randn(2, 3, 32, 32),))


def densenet121() -> Case:
    torchvision = pytest.importorskip("torchvision")
    return Case(torchvision.models.densenet121(num_classes=10), (torch.randn(2, 3, 32, 32),))


def densenet_example() -> Case:
    example = load_example("densenet")
    return Case(example.model(40), example.example_inputs(4))


def preact_resnet_example() -> Case:
    example = load_example("resnet1001")
    return Case(example.model(29), example.example_inputs(4))


def timm_resnet10t() -> Case:
    timm = pytest.importorskip("timm")
    return Case(timm.create_model("resnet10t", num_classes=10), (torch.randn(2, 3, 32, 32),))


def mlp_example() -> Case:
    example = load_example("mlp")
    return Case(example.model(), example.example_inputs(512), random=True)


class NestedIO(nn.Module):
    """Tuple and dict outputs, a keyword argument, an optional keyword, a non-tensor one."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 64), nn.Tanh())
        self.head = nn.Linear(64, 8)
        self.gate = nn.Linear(16, 64)

    def forward(self, x, *, context, scale: float = 1.0, extra=None):
        h = self.encoder(x) * torch.sigmoid(self.gate(context)) * scale
        if extra is not None:
            h = h + extra
        logits = self.head(h)
        return logits, {"hidden": h, "pair": (logits.softmax(-1), h.mean(0))}


def nested_io() -> Case:
    return Case(NestedIO(), (torch.randn(256, 32),),
                {"context": torch.randn(256, 16), "scale": 0.5, "extra": torch.randn(256, 64)})


class ViewsInPlace(nn.Module):
    """Views, reshapes, transposes, slices and in-place updates of intermediate values, and a
    tensor constant made in forward (a ``get_attr`` in the joint graph)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(64, 128)
        self.b = nn.Linear(64, 64)
        self.c = nn.Linear(128, 16)

    def forward(self, x):
        h = self.a(x)                                 # (8, 128)
        left, right = h[:, :64], h.view(8, 2, 64)[:, 1]  # two views of one storage
        y = left.mul_(2.0).add_(right)                # in place on a view: h changes too
        z = self.b(torch.relu(y)).transpose(0, 1).contiguous().t()  # (8, 64), non-contiguous
        z[:, :32] = z[:, :32].sigmoid()              # in-place slice assignment
        h = h.view(8, 128) + z.repeat(1, 2) * torch.tensor(0.5)
        return self.c(torch.tanh(h)).flatten()


def views_in_place() -> Case:
    return Case(ViewsInPlace(), (torch.randn(8, 64),))


class StatefulNorms(nn.Module):
    """One BatchNorm applied twice, and one whose running mean the forward reads once updated."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.shared = nn.BatchNorm2d(8)
        self.read = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = self.shared(torch.relu(self.shared(self.conv(x))))
        y = self.read(x) + self.read.running_mean.view(1, -1, 1, 1)
        return self.head(y.mean((2, 3)))


def stateful_norms() -> Case:
    return Case(StatefulNorms(), (torch.randn(4, 3, 16, 16),))


BUILDERS: dict[str, Callable[[], Case]] = {
    "gpt2": gpt2,
    "bert": bert,
    "llama": llama,
    "resnet18": resnet18,
    "densenet121": densenet121,
    "densenet40": densenet_example,
    "preact_resnet29": preact_resnet_example,
    "timm_resnet10t": timm_resnet10t,
    "mlp": mlp_example,
    "nested_io": nested_io,
    "views_in_place": views_in_place,
    "stateful_norms": stateful_norms,
}


def build(name: str, seed: int = 0) -> Case:
    torch.manual_seed(seed)
    return BUILDERS[name]()
