"""Reward-model architectures: (image, question, candidate answers) -> rewards.

Every model takes a batch of B prompts with C candidate answers each,

    forward(image uint8 [B, 3, 64, 64], question [B, ...], answers [B, C, ...]) -> rewards [B, C],

where the text tensors are whatever the architecture's own text encoder makes
(`clients.text`). Training passes C = 2 (chosen, rejected) so that one batch row
holds one whole preference pair: Opacus' per-sample gradient of a row is then
the gradient of that pair, which is the privacy unit. Scoring passes C = 1.

Architectures (registry `ARCHITECTURES`, name -> builder):

* `cnn-gru`: small CNN image encoder, GRU over word tokens.
* `vit-xattn`: tiny ViT over 8x8 patches, character-level transformer over
  "question + answer" with cross-attention from the text to the patches; the
  head's context adds the fixed image features of `shape_features`.
* `minilm-head`: a small head trained on frozen features: MiniLM sentence
  embeddings of question and answer, and fixed colour/geometry image features.

No layer uses batch statistics (no BatchNorm), so every row's reward depends on
that row only, as DP-SGD requires.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from secure_mor.clients.text import PAD, CharTokenizer, MiniLMEncoder, TextEncoder, WordTokenizer

IMAGE_SIZE = 64


def images_to_tensor(images: Sequence[Image.Image | np.ndarray]) -> torch.Tensor:
    """PIL images or HxWx3 uint8 arrays -> uint8 tensor [N, 3, 64, 64] (resized if needed)."""
    out = torch.empty((len(images), 3, IMAGE_SIZE, IMAGE_SIZE), dtype=torch.uint8)
    for i, image in enumerate(images):
        pil = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, dtype=np.uint8))
        pil = pil.convert("RGB")
        if pil.size != (IMAGE_SIZE, IMAGE_SIZE):
            pil = pil.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)
        out[i] = torch.from_numpy(np.array(pil, dtype=np.uint8)).permute(2, 0, 1)
    return out


def _pixels(image: torch.Tensor) -> torch.Tensor:
    return image.float() / 255.0 - 0.5


SHAPE_FEATURES = 12


def shape_features(image: torch.Tensor) -> torch.Tensor:
    """Fixed (not learned) image features [B, SHAPE_FEATURES]: the colour of the background
    (corner pixel) and of the foreground (pixels that differ from it), and the
    foreground's area, bounding box and fill ratio (circle ~0.79, rectangle 1,
    triangle 0.5). Few, informative inputs are what a DP-trained head needs."""
    x = image.float() / 255.0
    background = x[:, :, 0, 0]
    mask = ((x - background[:, :, None, None]).abs().amax(1) > 0.15).float()  # [B, H, W]
    area = mask.mean((1, 2))
    height, width = mask.amax(2).mean(1), mask.amax(1).mean(1)
    fill = area / (height * width).clamp(min=1e-3)
    foreground = (x * mask[:, None]).sum((2, 3)) / mask.sum((1, 2)).clamp(min=1.0)[:, None]
    geometry = torch.stack([area, height, width, fill, height / width.clamp(min=1e-3), (area > 0).float()], 1)
    return torch.cat([background, foreground, geometry], 1) * 2 - 1


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches, each mapped by one nn.Linear: [B, C, H, W] ->
    [B, H/p, W/p, out] (channels last). The same function as Conv2d(C, out, p,
    stride=p), but DP-SGD's per-sample gradient is one einsum over the patches,
    where a convolution's needs an im2col copy of the input (measured: most of
    the per-sample gradient time of the CNN)."""

    def __init__(self, in_channels: int, out_channels: int, patch: int) -> None:
        super().__init__()
        self.patch = patch
        self.linear = nn.Linear(in_channels * patch * patch, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        p = self.patch
        patches = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, h // p, w // p, c * p * p)
        return self.linear(patches)


class BilinearHead(nn.Module):
    """Rewards [B, C] of C candidate answers a [B, C, A] given a context c [B, D]
    (or one per candidate, [B, C, D]):
    r = a^T (W c + b), with W and b starting at zero. At that start the gradient
    in W is a c^T, not zero: unlike a product of two learned layers, training
    starts away from a saddle point, which matters when DP noise swamps small
    gradients."""

    def __init__(self, context_dim: int, answer_dim: int) -> None:
        super().__init__()
        self.bilinear = nn.Linear(context_dim, answer_dim)
        nn.init.zeros_(self.bilinear.weight)
        nn.init.zeros_(self.bilinear.bias)

    def forward(self, context: torch.Tensor, answers: torch.Tensor) -> torch.Tensor:
        weights = self.bilinear(context)  # context [B, D] (shared) or [B, C, D] (one per candidate)
        return (answers * (weights.unsqueeze(1) if weights.dim() == 2 else weights)).sum(-1)


# ------------------------------------------------------------------ cnn-gru


class GRU(nn.Module):
    """A one-layer GRU (PyTorch's equations) over [..., T, D] inputs -> [..., T, H].

    Written out rather than nn.GRU so that it runs on any leading dimensions: the
    question and both answers of a pair go through it in one call. Its weights
    are used through F.linear only, so expanded weights (grad-sample mode "ew")
    accumulate their per-pair gradients during the ordinary backward pass; in
    "hooks" mode Opacus, having no rule for this layer, recomputes the whole
    recurrence per pair with torch.func (measured: 2x slower)."""

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        bound = 1.0 / math.sqrt(hidden_size)
        self.weight_ih = nn.Parameter(torch.empty(3 * hidden_size, input_size).uniform_(-bound, bound))
        self.weight_hh = nn.Parameter(torch.empty(3 * hidden_size, hidden_size).uniform_(-bound, bound))
        self.bias_ih = nn.Parameter(torch.empty(3 * hidden_size).uniform_(-bound, bound))
        self.bias_hh = nn.Parameter(torch.empty(3 * hidden_size).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inputs = F.linear(x, self.weight_ih, self.bias_ih).unbind(-2)  # all time steps at once
        h = x.new_zeros(*x.shape[:-2], self.hidden_size)
        outputs = []
        for gi in inputs:
            i_r, i_z, i_n = gi.chunk(3, -1)
            h_r, h_z, h_n = F.linear(h, self.weight_hh, self.bias_hh).chunk(3, -1)
            r, z = torch.sigmoid(i_r + h_r), torch.sigmoid(i_z + h_z)
            h = (1 - z) * torch.tanh(i_n + r * h_n) + z * h
            outputs.append(h)
        return torch.stack(outputs, dim=-2)


class CnnGruReward(nn.Module):
    def __init__(self, vocab_size: int, dim: int = 16, channels: int = 16) -> None:
        super().__init__()
        self.patch = PatchEmbed(3, channels // 2, 4)  # = Conv2d(3, channels // 2, 4, stride=4)
        self.conv = nn.Conv2d(channels // 2, channels, 3, stride=2, padding=1)
        self.embed = nn.Embedding(vocab_size, dim)
        self.gru = GRU(dim, dim)
        self.context = nn.Linear(channels + dim, dim)
        self.head = BilinearHead(channels + 2 * dim, dim)

    def image(self, image: torch.Tensor) -> torch.Tensor:
        # Contiguous: Opacus' conv grad sampler (hooks) silently gives wrong per-sample
        # gradients for a channels-last input, and expanded weights fail on one.
        x = torch.relu(self.patch(_pixels(image))).permute(0, 3, 1, 2).contiguous()
        # Max-pooling finds a small shape anywhere in the image; averaging would dilute it.
        return torch.relu(self.conv(x)).amax((2, 3))

    def forward(self, image: torch.Tensor, question: torch.Tensor, answers: torch.Tensor) -> torch.Tensor:
        # Question and answers as one [B, 1 + C, T] batch of texts: one GRU call per step.
        length = max(question.shape[-1], answers.shape[-1])
        question = F.pad(question, (0, length - question.shape[-1])).unsqueeze(1)
        texts = torch.cat([question, F.pad(answers, (0, length - answers.shape[-1]))], dim=1)
        states = self.gru(self.embed(texts))
        # The state after each text's last real token (texts are right-padded).
        last = ((texts != PAD).sum(-1).clamp(min=1) - 1).unsqueeze(-1).unsqueeze(-1)
        encoded = states.gather(2, last.expand(-1, -1, 1, states.shape[-1])).squeeze(2)
        inputs = torch.cat([self.image(image), encoded[:, 0]], -1)
        context = torch.cat([inputs, torch.relu(self.context(inputs))], -1)
        return self.head(context, encoded[:, 1:])


# ---------------------------------------------------------------- vit-xattn


class Attention(nn.Module):
    """Multi-head attention from nn.Linear layers (Opacus computes their per-sample
    gradients); works on any leading dimensions."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.heads, -1)).transpose(-2, -3)  # [..., heads, T, d/heads]

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = self._split(self.q(x)), self._split(self.k(context)), self._split(self.v(context))
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        if mask is not None:  # mask [..., S]: True where the key is a real token
            scores = scores.masked_fill(~mask.unsqueeze(-2).unsqueeze(-2), -1e9)
        out = (scores.softmax(-1) @ v).transpose(-2, -3).flatten(-2)
        return self.o(out)


class Block(nn.Module):
    """Pre-norm transformer block: self-attention, optional cross-attention, MLP.

    `prefix` (states [..., P, dim]) are extra keys and values for the self-attention, read but
    not updated: text that later tokens attend to without paying for it again."""

    def __init__(self, dim: int, heads: int, cross: bool = False) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm2, self.cross = (nn.LayerNorm(dim), Attention(dim, heads)) if cross else (None, None)
        self.norm3 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, context: torch.Tensor | None = None,
        prefix: torch.Tensor | None = None, prefix_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        h = self.norm1(x)
        keys, keys_mask = h, mask
        if prefix is not None and prefix_mask is not None and mask is not None:
            keys, keys_mask = torch.cat([self.norm1(prefix), h], -2), torch.cat([prefix_mask, mask], -1)
        x = x + self.attn(h, keys, keys_mask)
        if self.cross is not None and context is not None:
            x = x + self.cross(self.norm2(x), context)
        return x + self.mlp(self.norm3(x))


def sinusoids(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """Fixed sine/cosine position codes [..., dim]: no parameters to privatise."""
    freqs = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(1000.0) / dim))
    angles = positions.float().unsqueeze(-1) * freqs
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class VitCrossAttentionReward(nn.Module):
    """A candidate's text (question chars, then answer chars) goes through a
    transformer block with cross-attention to the patch tokens of a tiny ViT;
    reward = bilinear(context, answer), where answer = the pooled answer tokens
    and context = [fixed `shape_features` of the image, the pooled question
    tokens, an MLP of both] (the question tokens of the candidate's own sequence:
    a candidate's reward never depends on the other candidates).

    What makes it learn under DP-SGD (measured on its own family, shape, 800
    pairs, epsilon 4): the first design (reward from the pooled question + answer
    tokens and the mean and max of the patch tokens) stayed at 0.50-0.55 held-out
    accuracy whatever the epochs, batch size, learning rate or clipping norm.
    Pooling the answer tokens apart from the question's (the few characters in
    which two answers differ are no longer diluted), the fixed image features,
    and leaving the patch statistics out of the context (nearly constant across
    images, they made up most of each pair's gradient norm, so after clipping
    little of it carried signal) bring it to 0.6-0.7."""

    def __init__(self, alphabet_size: int, question_len: int, dim: int = 16, heads: int = 2, patch: int = 8) -> None:
        super().__init__()
        self.question_len = question_len
        self.dim = dim
        self.patch = PatchEmbed(3, dim, patch)  # = Conv2d(3, dim, patch, stride=patch)
        self.image_block = Block(dim, heads)
        self.char = nn.Embedding(alphabet_size, dim)
        self.text_block = Block(dim, heads, cross=True)
        self.norm = nn.LayerNorm(dim)
        features = SHAPE_FEATURES + dim
        self.mix = nn.Linear(features, dim)
        self.head = BilinearHead(features + dim, dim)

    def _pool(self, states: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        weights = (ids != PAD).unsqueeze(-1).float()
        return self.norm((states * weights).sum(-2) / weights.sum(-2).clamp(min=1.0))

    def forward(self, image: torch.Tensor, question: torch.Tensor, answers: torch.Tensor) -> torch.Tensor:
        c, q_len = answers.shape[1], question.shape[-1]
        patches = self.patch(_pixels(image)).flatten(1, 2)
        patches = self.image_block(patches + sinusoids(torch.arange(patches.shape[1]), self.dim))
        # The question is read once per row; each candidate's answer chars (at positions from
        # `question_len` on, however much padding was trimmed) attend to the question's states
        # and to their own chars only, never to another candidate's.
        q_mask = question != PAD
        q = self.text_block(self.char(question) + sinusoids(torch.arange(q_len), self.dim), q_mask, patches)
        a_mask = answers != PAD
        a = self.char(answers) + sinusoids(self.question_len + torch.arange(answers.shape[-1]), self.dim)
        a = self.text_block(a, a_mask, patches.unsqueeze(1), prefix=q.unsqueeze(1).expand(-1, c, -1, -1),
                            prefix_mask=q_mask.unsqueeze(1).expand(-1, c, -1))
        inputs = torch.cat([shape_features(image), self._pool(q, question)], -1).unsqueeze(1).expand(-1, c, -1)
        context = torch.cat([inputs, torch.relu(self.mix(inputs))], -1)  # [B, C, features + dim]
        return self.head(context, self._pool(a, answers))


# -------------------------------------------------------------- minilm-head


class FrozenFeatureReward(nn.Module):
    """Head on frozen features: MiniLM features of question and answer, and
    `shape_features` of the image; context = [image, question, MLP(image, question)].
    The MLP adds the image x question interactions that yes/no questions need: "is there
    a red shape?" is answered by comparing the asked colour with the image's, which one
    layer of 16 units never learned (presence answered from the question alone, image
    dependence 0.01-0.07 at any data size); two layers of 64 learn it from the public
    warm start (training.PUBLIC_WARM_START)."""

    def __init__(self, text_dim: int, dim: int = 64) -> None:
        super().__init__()
        features = SHAPE_FEATURES + text_dim
        self.mix = nn.Sequential(nn.Linear(features, dim), nn.ReLU(), nn.Linear(dim, dim), nn.ReLU())
        self.head = BilinearHead(features + dim, text_dim)

    def forward(self, image: torch.Tensor, question: torch.Tensor, answers: torch.Tensor) -> torch.Tensor:
        inputs = torch.cat([shape_features(image), question], -1)
        return self.head(torch.cat([inputs, self.mix(inputs)], -1), answers)


# ------------------------------------------------------------------ registry


@dataclass(frozen=True)
class Architecture:
    """A reward-model family: how to build its text encoder from the client's own
    texts, and how to build the model for that encoder."""

    name: str
    description: str
    build_encoder: Callable[[Sequence[str]], TextEncoder]
    build_model: Callable[[TextEncoder], nn.Module]


def _word_encoder(texts: Sequence[str]) -> TextEncoder:
    return WordTokenizer.build(texts)


def _cnn_gru(encoder: TextEncoder) -> nn.Module:
    assert isinstance(encoder, WordTokenizer)
    return CnnGruReward(encoder.size)


def _char_encoder(texts: Sequence[str]) -> TextEncoder:
    return CharTokenizer()


def _vit(encoder: TextEncoder) -> nn.Module:
    assert isinstance(encoder, CharTokenizer)
    return VitCrossAttentionReward(encoder.size, encoder.max_len)


def _minilm_encoder(texts: Sequence[str]) -> TextEncoder:
    # 128 of MiniLM's 384 dimensions: own-family (presence) top-1 at epsilon 4 was 0.69 / 0.76 / 0.775
    # with 32 / 64 / 128 (seed 0); fewer inputs mean less DP noise, but 32 lost the question's meaning.
    return MiniLMEncoder(dim=128)


def _minilm_head(encoder: TextEncoder) -> nn.Module:
    assert isinstance(encoder, MiniLMEncoder)
    return FrozenFeatureReward(encoder.dim)


ARCHITECTURES: dict[str, Architecture] = {
    a.name: a
    for a in [
        Architecture("cnn-gru", "CNN image encoder + GRU over word tokens", _word_encoder, _cnn_gru),
        Architecture(
            "vit-xattn", "tiny ViT + char transformer with cross-attention, fixed image features", _char_encoder, _vit
        ),
        Architecture(
            "minilm-head", "head on frozen MiniLM text embeddings + fixed image features", _minilm_encoder, _minilm_head
        ),
    ]
}
DEFAULT_ARCHS = ("cnn-gru", "vit-xattn", "minilm-head")  # client k -> DEFAULT_ARCHS[k % 3]


def architecture(name: str) -> Architecture:
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown reward architecture {name!r}; choose one of {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[name]
