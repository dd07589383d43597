import pytest
import torch

from fusionkit.layers import Attention, CoAttentionLayer, TransformerBlock


@pytest.mark.parametrize("cross", [False, True])
def test_sdpa_matches_manual_softmax_attention(cross):
    torch.manual_seed(0)
    attn = Attention(32, num_heads=4, cross=cross, context_dim=24 if cross else None).eval()
    x = torch.randn(3, 7, 32)
    context = torch.randn(3, 5, 24) if cross else None
    n_keys = 5 if cross else 7
    mask = torch.ones(3, n_keys, dtype=torch.bool)
    mask[0, 3:] = False
    mask[2, 1:] = False
    fast = attn(x, context, key_mask=mask)
    manual = attn(x, context, key_mask=mask, use_sdpa=False)
    torch.testing.assert_close(fast, manual, atol=1e-5, rtol=1e-5)
    # the mask matters: without it the output differs
    assert not torch.allclose(fast, attn(x, context), atol=1e-4)


def test_masked_keys_do_not_influence_output():
    torch.manual_seed(0)
    block = TransformerBlock(16, 2).eval()
    x = torch.randn(2, 6, 16)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    y = block(x, mask)
    x2 = x.clone()
    x2[0, 4:] = 100 * torch.randn(2, 16)  # change only padded positions
    y2 = block(x2, mask)
    torch.testing.assert_close(y[0, :4], y2[0, :4])
    torch.testing.assert_close(y[1], y2[1])


def test_co_attention_padding_invariance_and_shapes():
    torch.manual_seed(0)
    layer = CoAttentionLayer(16, 2).eval()
    text, image = torch.randn(2, 5, 16), torch.randn(2, 4, 16)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    t, i = layer(text, mask, image)
    assert t.shape == text.shape and i.shape == image.shape
    text2 = text.clone()
    text2[0, 3:] = torch.randn(2, 16)
    t2, i2 = layer(text2, mask, image)
    torch.testing.assert_close(i, i2)  # image stream never sees text padding
    torch.testing.assert_close(t[0, :3], t2[0, :3])


def test_attention_rejects_bad_arguments():
    with pytest.raises(ValueError, match="divisible"):
        Attention(30, num_heads=4)
    attn = Attention(16, 2)
    with pytest.raises(ValueError, match="no context"):
        attn(torch.randn(1, 3, 16), torch.randn(1, 3, 16))
    with pytest.raises(ValueError, match="key_mask shape"):
        attn(torch.randn(2, 3, 16), key_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="needs a context"):
        Attention(16, 2, cross=True)(torch.randn(1, 3, 16))
