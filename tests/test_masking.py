"""keras_mfm.masking against NumPy references written from SPEC.md section 2 (token selection and
importance of MAE / AMT / FAMT). Runs on every backend."""

import itertools

import keras
import numpy as np
import pytest
from keras import ops

from keras_mfm import backbones, masking
from tests.conftest import BACKEND, to_numpy

# ---------------------------------------------------------------------------------------------
# NumPy references (from the SPEC formulas, not from keras_mfm)


def reference_amt(attention):
    """attention (B, H, 1+N, 1+N) -> (B, N)."""
    batch, heads = attention.shape[:2]
    out = np.zeros((batch, attention.shape[-1] - 1))
    for b in range(batch):
        for h in range(heads):
            row = attention[b, h, 0, 1:]
            out[b] += (row - row.min()) / (row.max() - row.min()) / heads
    return out


def reference_famt_attention(attention):
    batch, heads, size, _ = attention.shape
    n = size - 1
    out = np.zeros((batch, n))
    for b in range(batch):
        for j in range(1, size):
            first = np.mean([attention[b, h, 0, j] * np.mean(attention[b, h, 1:, 0]) for h in range(heads)])
            second = np.mean([np.mean(attention[b, h, 1:, j]) * attention[b, h, 0, 0] for h in range(heads)])
            out[b, j - 1] = first + second
    return out


def reference_low_frequency_energy(tokens, cutoff=0.15):
    """tokens (B, N, C) -> (B, N)."""
    batch, n, channels = tokens.shape
    k = np.arange(n)
    kernel = 1.0 - np.exp(-((k - (n - 1) / 2) ** 2) / (2 * (cutoff * n / 2) ** 2))
    out = np.zeros((batch, n))
    for b in range(batch):
        energy = np.zeros(n)
        for c in range(channels):
            spectrum = np.fft.fft(tokens[b, :, c], norm="ortho")
            low = np.fft.ifft(spectrum * kernel, norm="ortho")
            energy += np.abs(low)
        out[b] = energy / np.mean(np.sum(np.abs(tokens[b]), axis=1))
    return out


def reference_follow(maps, boxes, flips, grid):
    """Bilinear sampling at the crop's cell centres, edge-clamped (SPEC: crop, flip, resample)."""
    batch, h, w = maps.shape
    gh, gw = grid
    out = np.zeros((batch, gh, gw))
    for b in range(batch):
        y0, x0, y1, x1 = boxes[b]
        for r in range(gh):
            for c in range(gw):
                cc = gw - 1 - c if flips[b] else c
                y = y0 + (r + 0.5) / gh * (y1 - y0)
                x = x0 + (cc + 0.5) / gw * (x1 - x0)
                sy = min(max(y * h - 0.5, 0.0), h - 1.0)
                sx = min(max(x * w - 0.5, 0.0), w - 1.0)
                i0, j0 = int(np.floor(sy)), int(np.floor(sx))
                i1, j1 = min(i0 + 1, h - 1), min(j0 + 1, w - 1)
                fy, fx = sy - i0, sx - j0
                out[b, r, c] = (
                    (1 - fy) * (1 - fx) * maps[b, i0, j0]
                    + (1 - fy) * fx * maps[b, i0, j1]
                    + fy * (1 - fx) * maps[b, i1, j0]
                    + fy * fx * maps[b, i1, j1]
                )
    return out.reshape(batch, gh * gw)


def plackett_luce_split(weights, num_masked, num_thrown):
    """Exact P(token j masked / thrown / visible) under a weighted draw without replacement."""
    n = len(weights)
    probabilities = np.zeros((3, n))  # rows: visible, masked, thrown
    for perm in itertools.permutations(range(n)):
        p, remaining = 1.0, float(np.sum(weights))
        for token in perm:
            p *= weights[token] / remaining
            remaining -= weights[token]
        for position, token in enumerate(perm):
            if position < num_masked:
                probabilities[masking.MASKED, token] += p
            elif position < num_masked + num_thrown:
                probabilities[masking.THROWN, token] += p
            else:
                probabilities[masking.VISIBLE, token] += p
    return probabilities


def random_attention(rng, batch=2, heads=3, n=16):
    logits = rng.normal(size=(batch, heads, n + 1, n + 1)) * 2.0
    attention = np.exp(logits)
    return attention / attention.sum(-1, keepdims=True)


# ---------------------------------------------------------------------------------------------
# token_counts


def test_token_counts_spec_numbers():
    assert masking.token_counts(196, 0.45, 0.40) == (88, 78, 30)
    assert masking.token_counts(196, 0.75) == (147, 0, 49)
    assert masking.token_counts(196, 0.75, 0.0) == (147, 0, 49)
    assert masking.token_counts(64, 0.75) == (48, 0, 16)
    # MAE keeps int(N (1 - r)) = int(2.5) = 2 of 10 (and masks 8); AMT's rule masks int(N r) = 7
    assert masking.token_counts(10, 0.75) == (8, 0, 2)
    assert masking.token_counts(10, 0.75, rule="amt") == (7, 0, 3)
    assert masking.token_counts(16, 0.0, 0.5) == (0, 8, 8)
    assert masking.token_counts(64, 0.45, 0.40) == (28, 26, 10)
    assert masking.token_counts(49, 0.75) == (37, 0, 12)
    with pytest.raises(ValueError, match="throws nothing"):
        masking.token_counts(64, 0.45, 0.40, rule="mae")
    with pytest.raises(ValueError, match="Unknown counting rule"):
        masking.token_counts(64, 0.45, 0.40, rule="famt")


def _authors_counts(num_tokens, mask_ratio, throw_ratio):
    """The authors' code, restated: MAE's `random_masking` (`len_keep = int(L * (1 - mask_ratio))`)
    without throwing; AMT's `len_mask_tail = int(L * mask_ratio)`, `len_keep_head =
    int(L * (mask_ratio + throw_ratio))` with it."""
    if throw_ratio == 0:
        keep = int(num_tokens * (1 - mask_ratio))
        return num_tokens - keep, 0, keep
    tail, head = int(num_tokens * mask_ratio), int(num_tokens * (mask_ratio + throw_ratio))
    return tail, head - tail, num_tokens - head


@pytest.mark.parametrize("num_tokens", [49, 64, 196, 256])
@pytest.mark.parametrize("ratios", [(0.75, 0.0), (0.45, 0.40), (0.44, 0.26), (0.6, 0.0)])
def test_token_counts_are_the_authors(num_tokens, ratios):
    assert masking.token_counts(num_tokens, *ratios) == _authors_counts(num_tokens, *ratios)


def test_models_use_the_authors_counts():
    """MAE masks 37 of 49 (not 36); FAMT at N = 64 masks 28, throws 26, keeps 10; its random
    warm-up masks with MAE's rule."""
    from keras_mfm.models.mae import MAE

    def model(size, **options):
        encoder = backbones.ViTBackbone(image_size=size, patch_size=4, hidden_dim=16, depth=1, num_heads=2)
        return MAE(encoder, decoder_dim=16, decoder_depth=1, decoder_heads=2, **options)

    assert model(28).counts == (37, 0, 12)
    famt = model(32, mask_ratio=0.45, throw_ratio=0.40, importance="famt", num_images=4)
    assert famt.counts == (28, 26, 10)
    famt.build()
    warmup = famt.select(np.zeros((2, 32, 32, 3), "float32"))
    assert tuple(warmup.masked.shape) == (2, 48) and tuple(warmup.visible.shape) == (2, 16)


@pytest.mark.parametrize(
    "args",
    [
        (196, 0.6, 0.4),  # mask + throw = 1: no visible token
        (196, 0.7, 0.5),
        (196, -0.1, 0.0),
        (196, 0.5, -0.2),
        (196, 1.0, 0.0),
        (196, float("nan"), 0.0),
        (4, 0.1, 0.0, "amt"),  # positive ratio masking no token (MAE's rule masks 4 - int(3.6) = 1)
        (4, 0.1, 0.1),
        (0, 0.5, 0.0),
        (16.0, 0.5, 0.0),
    ],
)
def test_token_counts_errors(args):
    with pytest.raises(ValueError):
        masking.token_counts(*args)


# ---------------------------------------------------------------------------------------------
# select_tokens / draw_order


def test_select_tokens_partition():
    rng = np.random.default_rng(0)
    weights = rng.random((64, 20)).astype("float32")
    selection = masking.select_tokens(weights, 0.45, 0.30, seed=3)
    visible, masked, thrown = (to_numpy(selection.visible), to_numpy(selection.masked), to_numpy(selection.thrown))
    labels, order = to_numpy(selection.labels), to_numpy(selection.order)
    assert visible.shape == (64, 5) and masked.shape == (64, 9) and thrown.shape == (64, 6)
    for array in (visible, masked, thrown, labels, order):
        assert array.dtype == np.int32
    for b in range(64):
        union = np.concatenate([visible[b], masked[b], thrown[b]])
        np.testing.assert_array_equal(np.sort(union), np.arange(20))  # disjoint, covering
        np.testing.assert_array_equal(np.sort(order[b]), np.arange(20))
        for part in (visible[b], masked[b], thrown[b]):
            assert np.all(np.diff(part) > 0)  # ascending
        assert np.all(labels[b, visible[b]] == masking.VISIBLE)
        assert np.all(labels[b, masked[b]] == masking.MASKED)
        assert np.all(labels[b, thrown[b]] == masking.THROWN)
        # the masked set is the first drawn, then the thrown one
        np.testing.assert_array_equal(np.sort(order[b, :9]), masked[b])
        np.testing.assert_array_equal(np.sort(order[b, 9:15]), thrown[b])
    assert (masking.VISIBLE, masking.MASKED, masking.THROWN) == (0, 1, 2)


def test_select_tokens_without_throwing():
    selection = masking.select_tokens(np.ones((64, 20), "float32"), 0.75, seed=0)
    assert tuple(selection.thrown.shape) == (64, 0)
    assert tuple(selection.masked.shape) == (64, 15) and tuple(selection.visible.shape) == (64, 5)
    assert np.all(np.isin(to_numpy(selection.labels), [masking.VISIBLE, masking.MASKED]))


def test_seeds():
    weights = np.random.default_rng(1).random((64, 20)).astype("float32")
    first = to_numpy(masking.select_tokens(weights, 0.5, 0.2, seed=7).labels)
    again = to_numpy(masking.select_tokens(weights, 0.5, 0.2, seed=7).labels)
    other = to_numpy(masking.select_tokens(weights, 0.5, 0.2, seed=8).labels)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    generator = keras.random.SeedGenerator(5)
    one = to_numpy(masking.draw_order(weights, seed=generator))
    two = to_numpy(masking.draw_order(weights, seed=generator))
    assert not np.array_equal(one, two)  # a SeedGenerator advances
    np.testing.assert_array_equal(one, to_numpy(masking.draw_order(weights, seed=keras.random.SeedGenerator(5))))


def test_first_and_second_draw_follow_weights():
    weights = np.arange(1, 7, dtype="float64")
    total = weights.sum()
    order = to_numpy(masking.draw_order(np.tile(weights, (20000, 1)).astype("float32"), seed=11))
    first = np.bincount(order[:, 0], minlength=6) / len(order)
    np.testing.assert_allclose(first, weights / total, atol=0.02)
    second_want = [sum(weights[i] / total * weights[j] / (total - weights[i]) for i in range(6) if i != j)
                   for j in range(6)]
    second = np.bincount(order[:, 1], minlength=6) / len(order)
    np.testing.assert_allclose(second, second_want, atol=0.02)


def test_split_frequencies_match_plackett_luce():
    weights = np.arange(1, 7, dtype="float64")
    num_masked, num_thrown, _ = masking.token_counts(6, 0.5, 0.34)
    assert (num_masked, num_thrown) == (3, 2)
    labels = to_numpy(masking.select_tokens(np.tile(weights, (20000, 1)).astype("float32"), 0.5, 0.34, seed=2).labels)
    want = plackett_luce_split(weights, num_masked, num_thrown)
    for label in (masking.VISIBLE, masking.MASKED, masking.THROWN):
        np.testing.assert_allclose(np.mean(labels == label, axis=0), want[label], atol=0.02)
    masked = np.mean(labels == masking.MASKED, axis=0)
    assert masked[5] > masked[0] + 0.3  # important tokens tend to be masked
    visible = np.mean(labels == masking.VISIBLE, axis=0)
    assert visible[0] > visible[5]


def test_uniform_weights_are_random_masking():
    labels = to_numpy(masking.select_tokens(np.ones((20000, 10), "float32"), 0.4, seed=4).labels)
    assert np.all(np.sum(labels == masking.MASKED, axis=1) == 4)
    np.testing.assert_allclose(np.mean(labels == masking.MASKED, axis=0), 0.4, atol=0.03)


def test_zero_weights_come_last():
    weights = np.tile(np.array([0, 1, 0, 2, 3, 0, 5, 1e-20, 4, 0], "float32"), (20000, 1))
    order = to_numpy(masking.draw_order(weights, seed=9))
    positive = weights[0] > 0
    assert np.all(positive[order[:, :6]]) and not np.any(positive[order[:, 6:]])
    # zero-weight tokens are shuffled uniformly among themselves
    last = np.bincount(order[:, -1], minlength=10) / len(order)
    np.testing.assert_allclose(last[~positive], 0.25, atol=0.03)
    labels = to_numpy(masking.select_tokens(weights, 0.3, 0.3, seed=9).labels)
    assert np.all(labels[:, ~positive] == masking.VISIBLE)


def test_all_zero_row_is_uniform_and_scale_invariance():
    rng = np.random.default_rng(3)
    weights = rng.random((20000, 10)).astype("float32")
    weights[::2] = 0.0
    ones = weights.copy()
    ones[::2] = 1.0
    np.testing.assert_array_equal(to_numpy(masking.draw_order(weights, seed=6)),
                                  to_numpy(masking.draw_order(ones, seed=6)))
    # Gumbel-top-k only depends on log-weight differences (x4 is exact in float32)
    np.testing.assert_array_equal(to_numpy(masking.draw_order(4 * weights, seed=6)),
                                  to_numpy(masking.draw_order(weights, seed=6)))
    zero_labels = to_numpy(masking.select_tokens(np.zeros((20000, 10), "float32"), 0.5, seed=1).labels)
    np.testing.assert_allclose(np.mean(zero_labels == masking.MASKED, axis=0), 0.5, atol=0.03)


@pytest.mark.parametrize("bad", [np.nan, -1.0, np.inf])
def test_invalid_weights(bad):
    weights = np.ones((2, 8), "float32")
    weights[1, 3] = bad
    with pytest.raises(ValueError):
        masking.check_weights(weights)
    with pytest.raises(ValueError):
        masking.select_tokens(weights, 0.5, seed=0)
    with pytest.raises(ValueError):
        masking.draw_order(weights, seed=0)
    with pytest.raises(ValueError):  # eager tensors are checked too
        masking.select_tokens(ops.convert_to_tensor(weights), 0.5, seed=0)
    masking.select_tokens(weights, 0.5, seed=0, validate=False)  # opt-out: no error
    assert masking.check_weights(np.zeros((2, 3))) is not None


def test_weights_rank():
    with pytest.raises(ValueError):
        masking.select_tokens(np.ones((2, 4, 4), "float32"), 0.5)
    with pytest.raises(ValueError):
        masking.select_tokens(np.ones((2, 4), "float32"), 0.5, 0.5)


def test_select_tokens_traced():
    """Inside a traced function the weights cannot be checked, but selection works and is seeded."""
    weights = np.random.default_rng(2).random((64, 20)).astype("float32")
    eager = to_numpy(masking.select_tokens(weights, 0.45, 0.4, seed=12).labels)

    def labels(w):
        return masking.select_tokens(w, 0.45, 0.4, seed=12).labels

    if BACKEND == "jax":
        import jax

        traced = np.asarray(jax.jit(labels)(weights))
    elif BACKEND == "tensorflow":
        import tensorflow as tf

        traced = tf.function(labels)(tf.constant(weights)).numpy()
        # Under XLA, TF's stateless RNG uses another algorithm: a valid but different draw.
        compiled = tf.function(labels, jit_compile=True)(tf.constant(weights)).numpy()
        assert np.all(np.sum(compiled == masking.MASKED, axis=1) == 9)
        assert np.all(np.sum(compiled == masking.THROWN, axis=1) == 8)
    else:
        pytest.skip("torch has no tracing that hides values from convert_to_numpy in eager Keras")
    np.testing.assert_array_equal(traced, eager)


# ---------------------------------------------------------------------------------------------
# importance


def test_amt_importance_hand_case():
    attention = np.zeros((2, 2, 4, 4), "float32")
    head_a = [0.4, 0.1, 0.3, 0.2]  # patches [0.1, 0.3, 0.2] -> [0, 1, 0.5]
    head_b = [0.5, 0.2, 0.2, 0.1]  # patches [0.2, 0.2, 0.1] -> [1, 1, 0]
    attention[0, :, 0] = head_a  # both heads alike: [0, 1, 0.5]
    attention[1, 0, 0], attention[1, 1, 0] = head_a, head_b  # head mean: [0.5, 1, 0.25]
    np.testing.assert_allclose(to_numpy(masking.amt_importance(attention)), [[0.0, 1.0, 0.5], [0.5, 1.0, 0.25]],
                               atol=1e-6)


def test_importance_matches_reference():
    rng = np.random.default_rng(0)
    attention = random_attention(rng)
    tokens = rng.normal(size=(2, 16, 8))
    a32, t32 = attention.astype("float32"), tokens.astype("float32")
    amt = to_numpy(masking.amt_importance(a32))
    assert amt.shape == (2, 16) and amt.dtype == np.float32
    np.testing.assert_allclose(amt, reference_amt(attention), rtol=1e-5, atol=1e-6)
    score = to_numpy(masking.famt_attention_score(a32))
    np.testing.assert_allclose(score, reference_famt_attention(attention), rtol=1e-5)
    for cutoff in (0.15, 0.3):
        energy = to_numpy(masking.low_frequency_energy(t32, cutoff))
        assert energy.shape == (2, 16) and energy.dtype == np.float32
        np.testing.assert_allclose(energy, reference_low_frequency_energy(tokens, cutoff), rtol=1e-5)
    importance = to_numpy(masking.famt_importance(a32, t32))
    want = reference_famt_attention(attention) * reference_low_frequency_energy(tokens)
    np.testing.assert_allclose(importance, want, rtol=1e-5)


def test_importance_hand_cases():
    n = 16
    uniform = np.full((2, 3, n + 1, n + 1), 1.0 / (n + 1), "float32")
    np.testing.assert_allclose(to_numpy(masking.famt_attention_score(uniform)), np.full((2, n), 2.0 / (n + 1) ** 2),
                               rtol=1e-5)
    np.testing.assert_allclose(to_numpy(masking.amt_importance(uniform)), np.zeros((2, n)), atol=1e-6)
    # constant along the tokens: only the zero frequency, kernel ~1 there -> energy 1
    constant = np.tile(np.array([1.0, -2.0, 0.5, 3.0, 0.0, 1.0, 1.0, -1.0], "float32"), (2, n, 1))
    np.testing.assert_allclose(to_numpy(masking.low_frequency_energy(constant)), np.ones((2, n)), rtol=1e-5)
    # alternating sign: only frequency N/2, kept with weight g_{N/2} = 1 - exp(-0.25 / (2 * 1.2^2))
    alternating = ((-1.0) ** np.arange(n))[None, :, None] * np.ones((2, n, 8))
    g_half = 1.0 - np.exp(-0.25 / (2 * (0.15 * n / 2) ** 2))
    energy = to_numpy(masking.low_frequency_energy(alternating.astype("float32")))
    np.testing.assert_allclose(energy, np.full((2, n), g_half), rtol=1e-5)


def test_importance_errors():
    rng = np.random.default_rng(0)
    attention = random_attention(rng).astype("float32")
    with pytest.raises(ValueError, match="patch tokens only"):
        masking.famt_importance(attention, rng.normal(size=(2, 17, 8)).astype("float32"))
    with pytest.raises(ValueError):
        masking.amt_importance(attention[:, :, :, :5])
    with pytest.raises(ValueError):
        masking.low_frequency_energy(np.ones((2, 16), "float32"))
    with pytest.raises(ValueError):
        masking.low_frequency_energy(np.ones((2, 16, 3), "float32"), cutoff=0.0)


# ---------------------------------------------------------------------------------------------
# follow_augmentation


def test_follow_identity_and_flip():
    maps = np.random.default_rng(0).random((6, 7, 9)).astype("float32")
    boxes = np.tile(np.array([0.0, 0.0, 1.0, 1.0], "float32"), (6, 1))
    out = to_numpy(masking.follow_augmentation(maps, boxes, np.zeros(6, bool), (7, 9)))
    assert out.shape == (6, 63) and out.dtype == np.float32
    np.testing.assert_array_equal(out, maps.reshape(6, 63))
    flips = np.array([1, 0, 1, 0, 0, 1])
    flipped = to_numpy(masking.follow_augmentation(maps, boxes, flips, (7, 9)))
    want = maps.copy()
    want[flips == 1] = want[flips == 1][:, :, ::-1]
    np.testing.assert_array_equal(flipped, want.reshape(6, 63))


def test_follow_quarter_crop_upsamples():
    # a linear map m[i, j] = 4 i + j is reproduced exactly by bilinear interpolation (inside the clamp)
    maps = (4.0 * np.arange(4)[:, None] + np.arange(4)[None, :])[None].astype("float32")
    box = np.array([[0.0, 0.0, 0.5, 0.5]], "float32")
    out = to_numpy(masking.follow_augmentation(maps, box, np.array([False]), 4)).reshape(4, 4)
    # output centres at source cell coordinates 0.5 r - 0.25 -> [-0.25 (clamped to 0), 0.25, 0.75, 1.25]
    coordinate = np.array([0.0, 0.25, 0.75, 1.25])
    np.testing.assert_allclose(out, 4 * coordinate[:, None] + coordinate[None, :], atol=1e-6)
    # piecewise constant top-left 2x2 block: the corner keeps its cell's value, the rest blends
    blocks = np.zeros((1, 4, 4), "float32")
    blocks[0, :2, :2] = [[1.0, 2.0], [3.0, 4.0]]
    out = to_numpy(masking.follow_augmentation(blocks, box, np.array([False]), 4)).reshape(4, 4)
    assert out[0, 0] == 1.0
    bilinear = 0.75 * 0.75 * 1 + 0.75 * 0.25 * 2 + 0.25 * 0.75 * 3 + 0.25 * 0.25 * 4
    np.testing.assert_allclose(out[1, 1], bilinear, rtol=1e-6)


def test_follow_aligned_crop_is_a_slice():
    maps = np.random.default_rng(1).random((2, 8, 8)).astype("float32")
    boxes = np.array([[0.25, 0.5, 0.75, 1.0]] * 2, "float32")
    out = to_numpy(masking.follow_augmentation(maps, boxes, np.array([0, 1]), (4, 4))).reshape(2, 4, 4)
    np.testing.assert_allclose(out[0], maps[0, 2:6, 4:8], atol=1e-6)
    np.testing.assert_allclose(out[1], maps[1, 2:6, 4:8][:, ::-1], atol=1e-6)


def test_follow_matches_reference():
    rng = np.random.default_rng(2)
    maps = rng.random((6, 7, 9))
    y0, x0 = rng.uniform(0, 0.5, size=(2, 6))
    y1, x1 = y0 + rng.uniform(0.2, 0.5, size=6), x0 + rng.uniform(0.2, 0.5, size=6)
    boxes = np.stack([y0, x0, y1, x1], axis=1)
    flips = rng.random(6) < 0.5
    for grid in [(7, 9), (5, 3)]:
        got = to_numpy(masking.follow_augmentation(maps.astype("float32"), boxes.astype("float32"), flips, grid))
        np.testing.assert_allclose(got, reference_follow(maps, boxes, flips, grid), atol=1e-5)


def test_follow_errors():
    with pytest.raises(ValueError):
        masking.follow_augmentation(np.ones((2, 16), "float32"), np.ones((2, 4)), np.zeros(2), 4)
    with pytest.raises(ValueError):
        masking.follow_augmentation(np.ones((2, 4, 4), "float32"), np.ones((2, 3)), np.zeros(2), 4)
    with pytest.raises(ValueError):
        masking.follow_augmentation(np.ones((2, 4, 4), "float32"), np.ones((2, 4)), np.zeros(2), (0, 4))
