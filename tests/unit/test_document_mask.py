"""data.document_mask: a packed window with document masking gives each document the logits it gets alone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ep_train.config import load_config, parse_overrides
from ep_train.model import build_model
from ep_train.model.transformer import document_ids, document_mask, document_positions, eod_masked_targets
from ep_train.parallel import checkpoint_blocks

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"
EOS = 2


def _model(*extra: str):  # type: ignore[no-untyped-def]
    cfg = load_config(CONFIG, parse_overrides(["--capacity_factor", "null", *extra]))  # dropless: per token
    torch.manual_seed(0)
    return cfg, build_model(cfg.model, cfg.moe, seed=3).double()


def _packed(lengths: list[int], vocab: int, seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    docs = []
    for n in lengths:
        d = torch.randint(4, vocab, (n,), generator=g)
        d[-1] = EOS  # each document ends with EOS, as data_prep_tool writes it
        docs.append(d)
    return torch.cat(docs)[None], docs


def test_document_ids_positions_and_mask_by_hand() -> None:
    x = torch.tensor([[5, 6, EOS, 7, EOS, EOS, 8]])
    doc = document_ids(x, EOS)
    assert doc.tolist() == [[0, 0, 0, 1, 1, 2, 3]]
    assert document_positions(doc).tolist() == [[0, 1, 2, 0, 1, 0, 0]]
    m = document_mask(doc)[0, 0].int().tolist()
    assert m[4] == [0, 0, 0, 1, 1, 0, 0] and m[2] == [1, 1, 1, 0, 0, 0, 0] and m[6] == [0] * 6 + [1]


@pytest.mark.parametrize("reset", [False, True])
def test_packed_logits_equal_each_document_alone(reset) -> None:
    cfg, model = _model()
    x, docs = _packed([9, 17, 1, 30, 7], cfg.model.vocab_size, seed=1)
    doc = document_ids(x, EOS)
    with torch.no_grad():
        packed = model(x, None, doc, document_positions(doc) if reset else None).logits[0]
        plain = model(x).logits[0]
        start = 0
        for d in docs:
            alone = model(d[None]).logits[0]
            # RoPE sees only relative positions: without the reset the shifted document gives the same logits
            assert (packed[start:start + len(d)] - alone).abs().max().item() < 1e-5
            start += len(d)
        assert (plain[9:] - packed[9:]).abs().max().item() > 1e-3  # without the mask the documents do mix


def test_document_mask_under_activation_checkpointing_same_gradients() -> None:
    cfg, ref = _model()
    _, ckpt = _model()
    checkpoint_blocks(ckpt, "full")
    x, _ = _packed([12, 20, 31], cfg.model.vocab_size, seed=2)
    y = torch.roll(x, -1, dims=1)
    doc = document_ids(x, EOS)
    pos = document_positions(doc)
    for m in (ref, ckpt):
        m(x, y, doc, pos).loss.backward()
    for (n, a), (_, b) in zip(ref.named_parameters(), ckpt.named_parameters()):
        assert a.grad is not None and torch.allclose(a.grad, b.grad, rtol=1e-9, atol=1e-12), n


def test_reset_positions_needs_document_mask() -> None:
    with pytest.raises(ValueError, match=r"data.reset_positions = True is invalid: needs data.document_mask"):
        load_config(CONFIG, parse_overrides(["--reset_positions", "true"]))


def test_eod_masked_targets_by_hand() -> None:
    x = torch.tensor([[5, EOS, 7, EOS, 8]])
    y = torch.tensor([[EOS, 7, EOS, 8, 9]])  # y[i] follows x[i]
    assert eod_masked_targets(x, y, EOS).tolist() == [[EOS, -100, EOS, -100, 9]]
    assert y.tolist() == [[EOS, 7, EOS, 8, 9]]  # a new tensor: the batch itself is left as it was


def test_eod_mask_loss_is_the_mean_over_the_other_targets() -> None:
    """The model's loss with the masked targets equals cross-entropy over the positions whose input is not
    EOS, selected here by boolean indexing of the logits (not through ignore_index)."""
    import torch.nn.functional as F

    cfg, model = _model()
    x, _ = _packed([9, 17, 1, 30, 7], cfg.model.vocab_size, seed=2)
    y = torch.cat([x[:, 1:], torch.full((1, 1), 5)], dim=1)
    with torch.no_grad():
        out = model(x, eod_masked_targets(x, y, EOS))
        keep = x[0] != EOS
        assert int((~keep).sum()) == 5  # one EOS per document: five targets dropped
        want = F.cross_entropy(out.logits[0][keep].float(), y[0][keep])
        assert abs(out.lm_loss.item() - want.item()) < 1e-6 * want.item()  # fp32 sums in another order
        assert abs(model(x, y).lm_loss.item() - want.item()) > 1e-4  # the mask changes the loss


def test_eod_mask_loss_needs_an_eos_id(built, tmp_path) -> None:
    """The shards' EOS id, or a refusal naming the setting that needs it."""
    import json

    from ep_train.config import DataConfig
    from ep_train.train.trainer import shards_eos_id

    manifest = json.loads((built / "manifest.json").read_text())
    assert shards_eos_id(built, DataConfig(eod_mask_loss=True)) == manifest["tokenizer"]["eos_id"] >= 0
    manifest["tokenizer"]["eos_id"] = -1  # as `data_prep_tool adopt` writes for shards without EOS
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"data\.eod_mask_loss = true needs the EOS id .*eos_id = -1; .*"
                                         r"or set data\.eod_mask_loss false"):
        shards_eos_id(tmp_path, DataConfig(eod_mask_loss=True))
    with pytest.raises(ValueError, match=r"data\.document_mask = true"):
        shards_eos_id(tmp_path, DataConfig(document_mask=True, eod_mask_loss=True))


def test_a_micro_batch_with_every_target_masked_adds_no_lm_loss() -> None:
    """Only EOS tokens in the window: every target is masked; the LM term is 0 and its gradients 0 (not
    the NaN of a mean over nothing, which stopped the run), while the router terms still count."""
    cfg, model = _model()
    x = torch.full((1, 12), EOS)
    out = model(x, eod_masked_targets(x, torch.full((1, 12), 7), EOS))
    assert out.lm_loss.item() == 0.0 and torch.isfinite(out.loss) and out.loss.item() > 0
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert model.lm_head.weight.grad.abs().max().item() == 0.0
