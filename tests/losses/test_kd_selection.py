"""The KD factory: which row loss each setting selects, its parameter over training, and its refusals."""

from __future__ import annotations

import pytest
import torch

from sakd.config import validate
from sakd.errors import UserError
from sakd.losses.divergence import divergence
from sakd.losses.fused import FusedCachedForwardKL, FusedForwardKL
from sakd.losses.kd import KDSettings, logit_kd, top_k_kd
from sakd.models.head import model_head
from sakd.models.load import load_model, load_tokenizer
from sakd.train.loop import train


@pytest.fixture(scope="module")
def tokenizers(assets):
    load = load_tokenizer
    return load(str(assets["teacher"]), "teacher"), load(str(assets["student"]), "student")


def test_the_fused_path_is_chosen_for_forward_kl_and_jsd(assets, tokenizers):
    teacher_tok, student_tok = tokenizers
    teacher = load_model(str(assets["teacher"]), "teacher")
    head = model_head(teacher)
    for same, student in ((True, teacher_tok), (False, student_tok)):
        fused = logit_kd(KDSettings("forward_kl"), teacher_tok, student)
        plain = logit_kd(KDSettings("forward_kl", fused=False), teacher_tok, student)
        jsd = logit_kd(KDSettings("jsd"), teacher_tok, student)
        assert isinstance(fused.row_loss(1.0, head, len(student)), FusedForwardKL)
        assert not isinstance(plain.row_loss(1.0, head, len(student)), FusedForwardKL)
        fused_jsd = jsd.row_loss(1.0, head, len(student))
        assert isinstance(fused_jsd, FusedForwardKL) and fused_jsd.jsd_beta == 0.5
        reverse_end = logit_kd(KDSettings("jsd", 1.0), teacher_tok, student).row_loss(1.0, head, len(student))
        assert not isinstance(reverse_end, FusedForwardKL)
        forward_end = logit_kd(KDSettings("jsd", 0.0), teacher_tok, student).row_loss(1.0, head, len(student))
        assert isinstance(forward_end, FusedForwardKL) and forward_end.jsd_beta is None
        skew = logit_kd(KDSettings("skew_kl", 0.1), teacher_tok, student).row_loss(1.0, head, len(student))
        assert not isinstance(skew, FusedForwardKL)
        assert fused.kind.startswith("same-vocabulary" if same else "cross-vocabulary")
        assert isinstance(
            top_k_kd(KDSettings("forward_kl"), teacher_tok, student).row_loss(1.0), FusedCachedForwardKL
        )
        assert not isinstance(
            top_k_kd(KDSettings("skew_kl"), teacher_tok, student).row_loss(1.0), FusedCachedForwardKL
        )


def test_taid_target_moves_from_start_to_end_with_progress(tokenizers):
    teacher_tok, _ = tokenizers
    settings = KDSettings("taid", 0.4, parameter_end=1.0)
    assert settings.parameter_at(0.0) == 0.4 and settings.parameter_at(0.5) == pytest.approx(0.7)
    kd = logit_kd(settings, teacher_tok, teacher_tok)
    torch.manual_seed(0)
    v = len(teacher_tok)
    s, t = torch.randn(3, v), torch.randn(3, v) * 2
    for progress, share in ((0.0, 0.4), (0.5, 0.7), (1.0, 1.0)):
        expected = divergence("taid", s, torch.log_softmax(t, -1), 1.0, beta=share)
        torch.testing.assert_close(kd.at(1.0, progress)(s, t), expected)
    # At the end the target is the teacher itself: forward KL.
    torch.testing.assert_close(
        kd.at(1.0, 1.0)(s, t), divergence("forward_kl", s, torch.log_softmax(t, -1), 1.0)
    )


def test_akl_needs_one_vocabulary(tokenizers):
    teacher_tok, student_tok = tokenizers
    with pytest.raises(UserError, match="akl needs one vocabulary"):
        logit_kd(KDSettings("akl"), teacher_tok, student_tok)
    with pytest.raises(UserError, match="akl needs one vocabulary"):
        top_k_kd(KDSettings("akl"), teacher_tok, student_tok)
    assert logit_kd(KDSettings("akl"), teacher_tok, teacher_tok).kind == "same-vocabulary akl"


def test_config_gives_each_divergence_its_parameter(base_config):
    for name, key, value in (
        ("akl", "akl_mu", 0.3),
        ("taid", "taid_t_start", 0.2),
        ("skew_rkl", "skew_alpha", 0.2),
    ):
        cfg = validate({**base_config, "distill": {"divergence": name, key: value}})
        assert cfg.distill.divergence_parameter == value
        settings = KDSettings.of(cfg.distill)
        assert settings.parameter == value and (settings.parameter_end is not None) == (name == "taid")


@pytest.mark.parametrize(
    "name,student", [("akl", "student_same"), ("taid", "student_same"), ("taid", "student")]
)
def test_a_run_trains_with_each_new_divergence(base_config, assets, name, student):
    raw = {**base_config, "student": {"model": str(assets[student])}, "distill": {"divergence": name}}
    raw["train"] = {**raw["train"], "max_steps": 3, "ema_decay": None}
    summary = train(validate(raw))
    assert summary["skipped_steps"] == 0 and summary["eval"]["kd"] > 0
    assert name in summary["objective"]
