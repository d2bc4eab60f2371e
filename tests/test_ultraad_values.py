"""UltraAD formulas against numbers worked out by hand (ultraad.md parts 2-5).

Every expectation below is written out from the formula with explicit small numbers (unit
vectors ``e_i`` of the tiny model's 32-d joint space, a few chosen weights), never computed
with the method's own functions: ``g(f)``, the MiniNet offset that shifts every context vector,
the memory-boosted logits, the PIF prototypes, the cross-attention that gives ``T'``, and the
maps ``M`` / ``M'`` of one forward pass.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from bench.kit import PrototypeCrossAttention
from bench.weights import BackboneSpec, load_backbone
from methods.ultraad import UltraAD
from methods.ultraad.model import ResidualProjection, UltraADNet

#: Joint embedding width (class token, W_text) and text width of ``bench-tiny-vit``.
DIM, TEXT_WIDTH = 32, 64


#: Tiny tensors: one torch thread is faster and immune to other processes' load.
pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def backbone(tmp_path_factory: pytest.TempPathFactory):
    spec = BackboneSpec(
        "bench-tiny-vit", "none", cache_dir=tmp_path_factory.mktemp("ultraad-values-cache"), device="cpu"
    )
    loaded = load_backbone(spec)
    assert (loaded.embed_dim, loaded.text_width, loaded.grid) == (DIM, TEXT_WIDTH, (4, 4))
    return loaded


def vec(entries: dict[int, float], dim: int = DIM) -> torch.Tensor:
    """A vector with the given entries, zero elsewhere (``vec({0: 0.6, 1: 0.8})`` = 0.6 e0 + 0.8 e1)."""
    out = torch.zeros(dim)
    for index, value in entries.items():
        out[index] = value
    return out


def sigmoid(x: float) -> float:
    """``softmax([a, b])[1] = sigmoid(b - a)``: the abnormal probability of two logits."""
    return 1.0 / (1.0 + math.exp(-x))


def build_net(
    backbone,
    *,
    class_text: torch.Tensor,
    memory_keys: torch.Tensor | None = None,
    memory_values: torch.Tensor | None = None,
    **overrides: Any,
) -> UltraADNet:
    """An :class:`UltraADNet` with UltraAD's default options (``overrides`` replace some)."""
    return UltraADNet.from_options(
        backbone,
        {**UltraAD.default_config, **overrides},
        layer_positions=list(range(len(backbone.layers))),
        class_text=class_text,
        memory_keys=memory_keys,
        memory_values=memory_values,
        seed=0,
    )


def set_g(net: UltraADNet) -> None:
    """``g(f) = f + 0.2 * 6.25 * relu(f_0) e_2``: one live hidden unit (D / 4 = 8 of them).

    For ``f = 3 e0 + 4 e1`` (normalised: ``0.6 e0 + 0.8 e1``) this gives
    ``g = 0.6 e0 + 0.8 e1 + 0.75 e2``, of norm ``sqrt(0.36 + 0.64 + 0.5625) = 1.25``;
    for ``f = 5 e2`` (normalised: ``e2``) the hidden unit is off and ``g = e2``.
    """
    with torch.no_grad():
        net.g.mlp[0].weight.zero_()
        net.g.mlp[0].weight[0, 0] = 1.0
        net.g.mlp[2].weight.zero_()
        net.g.mlp[2].weight[2, 0] = 6.25


#: Class tokens of two images: ``3 e0 + 4 e1`` and ``5 e2``.
EMBEDS = torch.stack([vec({0: 3.0, 1: 4.0}), vec({2: 5.0})])
#: W_text of the maps / prototype tests: normal ``0.6 e0 + 0.8 e1``, benign ``e2``, malignant ``e3``.
W_TEXT = torch.stack([vec({0: 0.6, 1: 0.8}), vec({2: 1.0}), vec({3: 1.0})])


# --------------------------------------------------------------------------- g(f)


def test_g_is_a_residual_relu_bottleneck_by_hand() -> None:
    g = ResidualProjection(4, reduction=2, ratio=0.2)
    assert g.mlp[0].weight.shape == (2, 4) and g.mlp[0].bias is None and g.mlp[2].bias is None
    f = torch.tensor([[1.0, 2.0, 3.0, 4.0], [-1.0, -2.0, 0.0, 1.0]])
    assert torch.equal(g(f), f)  # zero-initialised last layer: the identity at the start
    with torch.no_grad():
        g.mlp[0].weight.copy_(torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, -1.0, 0.0, 0.0]]))
        g.mlp[2].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 0.0], [2.0, 1.0], [0.0, 3.0]]))
    # row 1: hidden relu([1 + 3, -2]) = [4, 0] -> MLP = [4, 0, 8, 0] -> f + 0.2 * MLP
    # row 2: hidden relu([-1, 2]) = [0, 2] -> MLP = [0, 0, 2, 6]
    expected = torch.tensor([[1.8, 2.0, 4.6, 4.0], [-1.0, -2.0, 0.4, 2.2]])
    torch.testing.assert_close(g(f), expected)
    g.ratio = 0.5
    torch.testing.assert_close(g(f), torch.tensor([[3.0, 2.0, 7.0, 4.0], [-1.0, -2.0, 1.0, 4.0]]))


@pytest.mark.parametrize(
    ("normalize", "expected"),
    [
        (True, [vec({0: 0.6, 1: 0.8, 2: 0.75}), vec({2: 1.0})]),  # g of 0.6 e0 + 0.8 e1 and of e2
        (False, [vec({0: 3.0, 1: 4.0, 2: 3.75}), vec({2: 5.0})]),  # 0.2 * 6.25 * relu(3) = 3.75
    ],
)
def test_the_shared_projected_class_token_by_hand(backbone, normalize: bool, expected: list) -> None:
    net = build_net(backbone, class_text=W_TEXT, normalize_class_token=normalize)
    set_g(net)
    with torch.no_grad():
        torch.testing.assert_close(net.project_class_token(EMBEDS), torch.stack(expected))


# --------------------------------------------------------------------------- MiniNet offset


def test_mininet_of_g_shifts_every_context_vector_by_hand(backbone, monkeypatch: pytest.MonkeyPatch) -> None:
    """``v_m(x) = v_m + pi(x)``, ``pi = MiniNet(g(f))``, in the token embeddings the text tower gets."""
    net = build_net(backbone, class_text=W_TEXT)
    set_g(net)  # g(f) = 0.6 e0 + 0.8 e1 + 0.75 e2 for image 1, e2 for image 2
    hidden = net.mininet[0]
    assert hidden.weight.shape == (DIM // 16, DIM)  # Linear(D, D / 16)
    with torch.no_grad():
        hidden.weight.zero_()
        hidden.weight[0, 2] = 1.0  # z0 = g_2 + 0.25
        hidden.weight[1, 0] = hidden.weight[1, 1] = -1.0  # z1 = -(g_0 + g_1): negative, cut by the ReLU
        hidden.bias.copy_(torch.tensor([0.25, 0.0]))
        out_layer = net.mininet[2]
        out_layer.weight.zero_()
        out_layer.weight[0, 0], out_layer.weight[1, 0] = 1.0, 2.0  # pi = relu(z0) (e0 + 2 e1) + ...
        out_layer.weight[3, 1] = 100.0  # ... 100 relu(z1) e3 (0: unit off) + 0.5 e2
        out_layer.bias.copy_(vec({2: 0.5}, TEXT_WIDTH))
        net.prompt.ctx.zero_()
        for m in range(4):
            net.prompt.ctx[m, 5] = m + 1.0  # v_m = (m + 1) e5
    # image 1: z0 = 0.75 + 0.25 = 1   -> pi = e0 + 2 e1 + 0.5 e2
    # image 2: z0 = 1 + 0.25 = 1.25   -> pi = 1.25 e0 + 2.5 e1 + 0.5 e2
    offsets = [vec({0: 1.0, 1: 2.0, 2: 0.5}, TEXT_WIDTH), vec({0: 1.25, 1: 2.5, 2: 0.5}, TEXT_WIDTH)]

    seen: list[torch.Tensor] = []
    encode = backbone.encode_embeddings

    def spy(embeddings: torch.Tensor, token_ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        seen.append(embeddings.detach().clone())
        return encode(embeddings, token_ids, **kwargs)

    monkeypatch.setattr(backbone, "encode_embeddings", spy)
    with torch.no_grad():
        net(EMBEDS, torch.randn(2, 4, 16, backbone.width), 4)
    (embeddings,) = seen
    length = embeddings.shape[1]
    phrases = [
        "a photo of a normal breast ultrasound image.",
        "a photo of a abnormal breast ultrasound image.",
    ]
    frozen = backbone.token_embeddings(backbone.tokenize(phrases))[:, :length]
    assert embeddings.shape == (4, length, TEXT_WIDTH)  # rows: (image 1, normal), (1, abnormal), (2, ...)
    for image in range(2):
        for state in range(2):
            row = embeddings[2 * image + state]
            for m in range(4):
                torch.testing.assert_close(row[1 + m], vec({5: m + 1.0}, TEXT_WIDTH) + offsets[image])
            # start token and the state phrase stay the frozen token embeddings, in (normal, abnormal) order
            torch.testing.assert_close(row[0], frozen[state, 0])
            torch.testing.assert_close(row[5:], frozen[state, 5:])


# --------------------------------------------------------------------------- memory logits


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (
            {},  # alpha 1, beta 5.5, scale 100 (ultraad.md part 4)
            [
                [
                    48 + math.exp(-5.5 * (1 - 0.48)),
                    64 + math.exp(-5.5 * (1 - 0.8)),
                    60 + math.exp(-5.5 * (1 - 0.768)) + math.exp(-5.5 * (1 - 0.6)),
                ],
                [math.exp(-5.5), math.exp(-5.5), 100 + math.exp(-5.5) + math.exp(0.0)],
            ],
        ),
        (
            {"alpha": 2.0, "beta": 1.0, "clip_logit_scale": 10.0},
            [
                [
                    4.8 + 2 * math.exp(-(1 - 0.48)),
                    6.4 + 2 * math.exp(-(1 - 0.8)),
                    6.0 + 2 * (math.exp(-(1 - 0.768)) + math.exp(-(1 - 0.6))),
                ],
                [2 * math.exp(-1.0), 2 * math.exp(-1.0), 10 + 2 * (math.exp(-1.0) + 1.0)],
            ],
        ),
    ],
)
def test_memory_logits_by_hand(backbone, options: dict[str, float], expected: list[list[float]]) -> None:
    """``scale * norm(g(f)) W_text^T + alpha * exp(-beta * (1 - norm(g(f)) F_mem^T)) L`` in ``forward``.

    Image 1: ``g(f) = 0.6 e0 + 0.8 e1 + 0.75 e2`` (norm 1.25), so ``q = 0.48 e0 + 0.64 e1 + 0.6 e2``;
    with ``W_text = [e0, e1, e2]`` the text logits are ``scale * [0.48, 0.64, 0.6]``. Memory keys
    (labels): ``e0`` (normal), ``1.25 e1`` (benign; keys are used as stored, not re-normalised),
    ``0.8 e0 + 0.6 e1`` and ``e2`` (malignant): affinities 0.48, 0.8, 0.384 + 0.384 = 0.768, 0.6.
    Image 2: ``q = e2``: text ``[0, 0, scale]``, affinities 0, 0, 0, 1.
    """
    keys = torch.stack([vec({0: 1.0}), vec({1: 1.25}), vec({0: 0.8, 1: 0.6}), vec({2: 1.0})])
    values = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [0, 0, 1.0]])
    w_text = torch.stack([vec({0: 1.0}), vec({1: 1.0}), vec({2: 1.0})])
    net = build_net(backbone, class_text=w_text, memory_keys=keys, memory_values=values, **options)
    set_g(net)
    with torch.no_grad():
        logits = net(EMBEDS, torch.randn(2, 4, 16, backbone.width), 4).logits
    torch.testing.assert_close(logits, torch.tensor(expected), rtol=0, atol=1e-4)


# --------------------------------------------------------------------------- PIF


def test_pif_prototypes_by_hand(backbone) -> None:
    """``t̂_n = norm(mean(t_n, W_n))``, ``t̂_a = norm(mean(t_a, W_b, W_m))`` (ultraad.md part 5)."""
    net = build_net(backbone, class_text=W_TEXT)  # W_n = 0.6 e0 + 0.8 e1, W_b = e2, W_m = e3
    prompts = torch.stack(
        [
            torch.stack([vec({0: 1.0}), vec({4: 1.0})]),  # image 1: t_n = e0, t_a = e4
            torch.stack([vec({1: 1.0}), vec({2: 1.0})]),  # image 2: t_n = e1, t_a = e2
        ]
    )
    expected = torch.stack(
        [
            # (e0 + 0.6 e0 + 0.8 e1) / 2 = 0.8 e0 + 0.4 e1 -> (2 e0 + e1) / sqrt(5); (e4 + e2 + e3) / sqrt(3)
            torch.stack([vec({0: 2.0, 1: 1.0}) / math.sqrt(5), vec({2: 1.0, 3: 1.0, 4: 1.0}) / math.sqrt(3)]),
            # (0.6 e0 + 1.8 e1) / 2 -> (e0 + 3 e1) / sqrt(10); (2 e2 + e3) / sqrt(5)
            torch.stack([vec({0: 1.0, 1: 3.0}) / math.sqrt(10), vec({2: 2.0, 3: 1.0}) / math.sqrt(5)]),
        ]
    )
    torch.testing.assert_close(net.prototypes(prompts), expected)


def test_pif_cross_attention_by_hand() -> None:
    """``T' = norm(T + MHA(q = T, k = v = norm(P)))`` with 2 heads of width 2.

    ``W_q = W_k = I``, ``W_v = 2 I``, output projection ``I``, no biases. Tokens ``2 e0`` and
    ``3 e3`` are normalised to ``e0`` and ``e3``. Query ``e0``: head 1 scores ``[1, 0] / sqrt(2)``
    -> weights ``[s, 1 - s]`` with ``s = e^(1/sqrt2) / (e^(1/sqrt2) + 1)``, values ``[2, 0]`` and 0
    -> ``[2s, 0]``; head 2 sees a zero query -> uniform -> ``(0 + [0, 2]) / 2 = [0, 1]``. So
    ``T'_1 = norm([1 + 2s, 0, 0, 1])`` and, by symmetry, ``T'_2 = norm([1, 0, 0, 1 + 2s])``.
    """
    attention = PrototypeCrossAttention(4, 2, normalize_tokens=True, zero_init=False)
    mha = attention.attention
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([torch.eye(4), torch.eye(4), 2 * torch.eye(4)]))
        mha.in_proj_bias.zero_()
        mha.out_proj.weight.copy_(torch.eye(4))
        mha.out_proj.bias.zero_()
    prototypes = torch.tensor([[[1.0, 0, 0, 0], [0, 0, 0, 1.0]]])
    tokens = torch.tensor([[[2.0, 0, 0, 0], [0, 0, 0, 3.0]]])
    s = math.exp(1 / math.sqrt(2)) / (math.exp(1 / math.sqrt(2)) + 1)
    norm = math.sqrt((1 + 2 * s) ** 2 + 1)
    expected = torch.tensor([[[1 + 2 * s, 0, 0, 1], [1, 0, 0, 1 + 2 * s]]]) / norm
    with torch.no_grad():
        torch.testing.assert_close(attention(prototypes, tokens), expected)
        # the keys / values are a set: their order does not matter
        torch.testing.assert_close(attention(prototypes, tokens.flip(1)), expected)
        # unnormalised tokens 2 e0, 3 e3: query e0 scores [2, 0] / sqrt(2) -> r = e^sqrt2 / (e^sqrt2 + 1),
        # head 1 = [4r, 0]; head 2 uniform over values 0 and [0, 6] -> [0, 3]
        attention.normalize_tokens = False
        r = math.exp(math.sqrt(2)) / (math.exp(math.sqrt(2)) + 1)
        raw = torch.tensor([1 + 4 * r, 0, 0, 3]) / math.sqrt((1 + 4 * r) ** 2 + 9)
        torch.testing.assert_close(attention(prototypes, tokens)[0, 0], raw)
        # zero-initialised output projection: T' = norm(T) whatever the tokens
        attention.attention.out_proj.weight.zero_()
        torch.testing.assert_close(attention(2 * prototypes, tokens), prototypes)


def test_maps_m_and_m_prime_of_one_forward_by_hand(backbone, monkeypatch: pytest.MonkeyPatch) -> None:
    """``M`` against the IAP prompts, ``M'`` against ``T'`` (= the prototypes at zero init), tau 1.

    Prompts ``t_n = e0``, ``t_a = e4``; prototypes ``(2 e0 + e1) / sqrt5`` and ``(e2 + e3 + e4) / sqrt3``
    (see the prototype test). Adapters keep the first 32 token dims. Layers 0-2: the top two
    patch rows hold ``3 e0``, the bottom two ``2 e2``; layer 3 holds ``2 e2`` everywhere.
    Abnormal probability = sigmoid(cos_a - cos_n): patch e0 -> sigmoid(-1) against the prompts,
    sigmoid(-2/sqrt5) against the prototypes; patch e2 -> sigmoid(0), sigmoid(1/sqrt3).
    """
    net = build_net(backbone, class_text=W_TEXT, tau=1.0)
    fixed_prompts = torch.stack([vec({0: 1.0}), vec({4: 1.0})])[None]
    monkeypatch.setattr(net.prompt, "forward", lambda *args, **kwargs: fixed_prompts)
    with torch.no_grad():
        for linear in net.adapters.linears:
            linear.weight.copy_(torch.eye(DIM, backbone.width))
            linear.bias.zero_()
        tokens = torch.zeros(1, 4, 16, backbone.width)
        tokens[0, :3, :8, 0] = 3.0
        tokens[0, :3, 8:, 2] = 2.0
        tokens[0, 3, :, 2] = 2.0
        out = net(EMBEDS[:1], tokens, 4)
    top = (3 * sigmoid(-1.0) + sigmoid(0.0)) / 4
    top_fused = (3 * sigmoid(-2 / math.sqrt(5)) + sigmoid(1 / math.sqrt(3))) / 4
    expected_m = torch.tensor([top] * 8 + [0.5] * 8).reshape(4, 4)
    expected_fused = torch.tensor([top_fused] * 8 + [sigmoid(1 / math.sqrt(3))] * 8).reshape(4, 4)
    torch.testing.assert_close(out.layer_maps[0, 3], torch.full((4, 4), 0.5))
    torch.testing.assert_close(out.map[0], expected_m)
    torch.testing.assert_close(out.fused_map[0], expected_fused)
