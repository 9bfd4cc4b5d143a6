"""Edit-mask loss: the mask-to-token mapping on a hand-computed case and the weighting formula."""

import torch

from qflux.loss import flow_matching_loss, mask_to_tokens


def test_mask_to_tokens_hand_computed():
    # 32x32 pixels -> 4x4 latent pixels (VAE factor 8) -> 2x2 tokens (2x2 packing), row-major.
    mask = torch.zeros(32, 32)
    mask[0:8, 0:4] = 1.0  # half of latent pixel (0, 0) -> 0.5, the max of token (0, 0)
    mask[24:32, 24:32] = 1.0  # all of latent pixel (3, 3) -> token (1, 1) = 1
    mask[16:18, 0:8] = 1.0  # a quarter of latent pixel (2, 0) -> token (1, 0) = 0.25
    assert mask_to_tokens(mask).tolist() == [0.5, 0.0, 0.25, 1.0]


def test_mask_to_tokens_keeps_leading_dims_and_token_order():
    mask = torch.zeros(2, 16, 48)  # 1 x 3 tokens per image
    mask[1, :, 32:48] = 1.0  # the last token of the second image
    tokens = mask_to_tokens(mask)
    assert tokens.shape == (2, 3)
    assert tokens.tolist() == [[0.0, 0.0, 0.0], [0.0, 0.0, 1.0]]


def test_weighted_loss_matches_formula():
    pred = torch.zeros(2, 3, 4)
    target = torch.zeros(2, 3, 4)
    target[0, 0] = 1.0  # squared error 1 on token 0 of sample 0
    target[1, 2] = 2.0  # squared error 4 on token 2 of sample 1
    mask = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.5]])
    fg, bg = 3.0, 1.0
    # sample 0: w = 3 on token 0 -> mean over tokens (3*1 + 0 + 0) / 3 = 1
    # sample 1: w = 3*0.5 + 1*0.5 = 2 on token 2 -> (2*4) / 3
    expected = (1.0 + 8.0 / 3.0) / 2
    assert torch.isclose(flow_matching_loss(pred, target, mask, fg, bg), torch.tensor(expected))


def test_unmasked_loss_is_plain_mse():
    pred, target = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    assert torch.isclose(flow_matching_loss(pred, target), torch.nn.functional.mse_loss(pred, target))


def test_unmasked_sample_weighs_one_in_a_mixed_batch():
    import torch

    from qflux.training.batching import collate
    from qflux.types import EncodedSample, PromptEmbeds

    def sample(key, mask):
        g = torch.Generator().manual_seed(len(key))
        return EncodedSample(key=key, latents=torch.randn(4, 2, generator=g), grid=(2, 2),
                             prompt=PromptEmbeds(hidden=torch.zeros(1, 2)), mask=mask)

    masked, plain = sample("a", torch.tensor([1.0, 0.0, 0.0, 0.0])), sample("bb", None)
    pred = torch.zeros(1, 4, 2)
    alone = flow_matching_loss(pred, plain.latents[None], None, 3.0, 0.5)
    mixed = collate([masked, plain])
    per_sample = [flow_matching_loss(pred, mixed.latents[i : i + 1], mixed.mask[i : i + 1], 3.0, 0.5,
                                     mixed.masked[i : i + 1]) for i in range(2)]
    assert torch.isclose(per_sample[1], alone)  # the unmasked sample is not re-weighted by fg / bg
    assert mixed.masked.tolist() == [True, False]
