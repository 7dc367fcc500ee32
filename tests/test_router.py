"""The student-aware router: shapes across widths and lengths, top-k, balance, token weights, gradients."""

from functools import partial

import pytest
import torch

from sakd.losses.auxiliary import standardise
from sakd.losses.divergence import forward_kl
from sakd.router import (
    StudentAwareRouter,
    aligned_group_states,
    blend_token_weights,
    bounded_unit_mean,
    chunked_gap,
    gap_weights,
    knowledge_gap,
    switch_balance_loss,
)

HS, HT, E = 24, 40, 4


def _router(**kwargs) -> StudentAwareRouter:
    torch.manual_seed(0)
    return StudentAwareRouter(HS, HT, E, dim=16, capacity_hidden=8, **kwargs)


def _rows(n: int = 12, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(n, HS, generator=g, requires_grad=True)
    sources = torch.randn(n, E, HT, generator=g)
    gap = torch.rand(n, generator=g) * 2
    return student, sources, gap


def test_mismatched_widths_and_lengths():
    """Student 9 tokens of width 24, teacher 12 tokens of width 40: the router sees only aligned groups."""
    b, ls, lt = 2, 9, 12
    student_group = torch.tensor([[0, 0, 1, 2, 2, 3, 4, 4, 4], [0, 1, 1, 2, 3, -1, -1, -1, -1]])
    teacher_group = torch.tensor(
        [[0, 1, 1, 1, 2, 3, 3, 4, 4, 4, 4, 4], [0, 0, 1, 2, 2, 3, 3, -1, -1, -1, -1, -1]]
    )
    align_mask = torch.tensor([[True, True, True, True, False], [True, True, True, False, False]])
    hidden = torch.randn(b, ls, HS, requires_grad=True)
    sources = torch.randn(b, lt, E, HT)
    states, source_rows = aligned_group_states(hidden, student_group, sources, teacher_group, align_mask)
    assert states.shape == (7, HS) and source_rows.shape == (7, E, HT)
    # Group 2 of window 0 holds teacher tokens 5 and 6 (group index 3 -> row 3).
    torch.testing.assert_close(source_rows[3], sources[0, 5:7].mean(0))
    torch.testing.assert_close(states[0], hidden[0, :2].mean(0))
    out = _router()(states, source_rows, torch.rand(7), top_k=2, temperature=1.0)
    assert out.token_weights.shape == out.capacity.shape == (7,)
    assert out.expert_probs.shape == out.routing_weights.shape == (7, E)
    assert out.feature_loss.shape == out.balance_loss.shape == ()
    out.feature_loss.backward()
    assert hidden.grad is not None and hidden.grad[1, 5:].abs().sum() == 0  # padding gets no gradient


def test_wrong_rows_are_refused():
    student, sources, gap = _rows()
    with pytest.raises(ValueError, match="aligned groups"):
        _router()(student[:-1], sources, gap, top_k=1, temperature=1.0)
    with pytest.raises(ValueError, match="built for 4 sources"):
        _router()(student, sources[:, :3], gap, top_k=1, temperature=1.0)


@pytest.mark.parametrize("top_k", [1, 2, 3, 4, 9])
def test_top_k_respected(top_k):
    student, sources, gap = _rows()
    out = _router()(student, sources, gap, top_k=top_k, temperature=0.7)
    k = min(top_k, E)
    weights = out.routing_weights.detach()
    assert ((weights > 0).sum(-1) == k).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(12))
    # The nonzero weights are exactly the k most probable sources.
    top = out.expert_probs.detach().topk(k, dim=-1).indices
    assert (weights.gather(1, top) > 0).all()


def test_temperature_sharpens_without_changing_choice():
    student, sources, gap = _rows()
    router = _router()
    hot = router(student, sources, gap, top_k=E, temperature=5.0).expert_probs.detach()
    cold = router(student, sources, gap, top_k=E, temperature=0.1).expert_probs.detach()
    assert (hot.argmax(-1) == cold.argmax(-1)).all()
    assert cold.max(-1).values.min() > hot.max(-1).values.max()


def test_balance_loss_uniform_is_one_and_below_collapse():
    n = 16
    valid = torch.ones(n, dtype=torch.bool)
    uniform = torch.full((n, E), 1 / E)
    balanced_top1 = torch.arange(n) % E
    assert switch_balance_loss(uniform, balanced_top1, valid).item() == pytest.approx(1.0)
    # Uniform probabilities give 1 whatever the top-1 assignment.
    assert switch_balance_loss(uniform, torch.zeros(n, dtype=torch.long), valid).item() == pytest.approx(1.0)
    collapsed = torch.zeros(n, E)
    collapsed[:, 0] = 1.0
    collapsed_loss = switch_balance_loss(collapsed, torch.zeros(n, dtype=torch.long), valid)
    assert collapsed_loss.item() == pytest.approx(E)
    # Padding rows do not count, and nothing valid gives 0.
    garbage = torch.cat([uniform, torch.full((3, E), float("nan"))])
    mask = torch.cat([valid, torch.zeros(3, dtype=torch.bool)])
    top1 = torch.cat([balanced_top1, torch.zeros(3, dtype=torch.long)])
    assert switch_balance_loss(garbage, top1, mask).item() == pytest.approx(1.0)
    assert switch_balance_loss(garbage, top1, torch.zeros_like(mask)).item() == 0.0


def test_router_balance_loss_tracks_collapse():
    """Identical sources (every score equal up to keys) versus one source dominating every row."""
    router = _router()
    student, sources, gap = _rows()
    with torch.no_grad():
        router.key.weight.zero_()
        router.key.bias.zero_()
    uniform = router(student, sources, gap, top_k=1, temperature=1.0)
    assert uniform.balance_loss.item() == pytest.approx(1.0)
    with torch.no_grad():
        router.key.bias.copy_(torch.randn(16))
    marked = sources.clone()
    marked[:, 2] = 0
    marked[:, 2, 0] = 50.0  # source 2 looks the same in every row: make its key match every query
    with torch.no_grad():
        router.query.weight.zero_()
        router.query.bias.fill_(1.0)
        router.key.weight.zero_()
        router.key.weight[:, 0] = 1.0
        router.key.bias.zero_()
    collapsed = router(student, marked, gap, top_k=1, temperature=0.1)
    assert (collapsed.expert_load == torch.tensor([0.0, 0.0, 1.0, 0.0])).all()
    assert collapsed.balance_loss.item() > 3.0 > uniform.balance_loss.item()


def test_token_weights_detached_mean_one_bounded():
    student, sources, _ = _rows(n=64)
    gap = torch.distributions.Exponential(0.2).sample((64,))  # heavy spread: the bounds must bind
    gap[0] = 500.0
    out = _router(min_weight=0.5, max_weight=2.0)(student, sources, gap, top_k=2, temperature=1.0)
    w = out.token_weights
    assert not w.requires_grad
    assert w.mean().item() == pytest.approx(1.0, abs=1e-5)
    assert w.min().item() >= 0.5 - 1e-6 and w.max().item() <= 2.0 + 1e-6
    assert w[0].item() == pytest.approx(2.0)


def test_token_weights_grow_with_gap_at_equal_capacity():
    router = _router()
    student, sources, _ = _rows(n=8)
    same_state = student[:1].detach().expand(8, HS)  # one state: one capacity for every row
    gap = torch.linspace(0.0, 3.0, 8)
    w = router(same_state, sources, gap, top_k=1, temperature=1.0).token_weights
    assert (w[1:] > w[:-1]).all()


def test_token_weights_follow_the_gap_once_the_capacity_probe_has_learned():
    """A probe trained to its target exp(-g / mean g) predicts low capacity exactly where the gap is large; the
    weights must still rise with the gap (a per-row capacity factor would invert them), with mean 1, bounded."""
    router = _router(min_weight=0.25, max_weight=4.0)
    g = torch.Generator().manual_seed(3)
    states = torch.randn(256, HS, generator=g)
    gap = torch.nn.functional.softplus(3.0 * states[:, 0]) + 0.01  # the state says how far behind it is
    optimizer = torch.optim.Adam(router.capacity_head.parameters(), lr=1e-2)
    for _ in range(300):
        _, capacity_loss = router.token_weights(states, gap)
        optimizer.zero_grad()
        capacity_loss.backward()
        optimizer.step()
    order = gap.argsort()
    easiest, hardest = order[:64], order[-64:]
    capacity = router.capacity_head(standardise(states)).squeeze(-1).sigmoid().detach()
    target = torch.exp(-gap / gap.mean())
    assert (capacity - target).abs().mean() < 0.05  # the probe has learned its target
    assert capacity[hardest].mean() < 0.5 * capacity[easiest].mean()

    weights, _ = router.token_weights(states, gap)
    assert (weights[order][1:] >= weights[order][:-1]).all()
    assert weights[hardest].mean() > 1.5 * weights[easiest].mean()
    assert weights.mean().item() == pytest.approx(1.0, abs=1e-5)
    assert weights.min() >= 0.25 - 1e-6 and weights.max() <= 4.0 + 1e-6
    # the full router gives the same weights
    sources = torch.randn(256, E, HT, generator=g)
    full = router(states, sources, gap, top_k=2, temperature=1.0).token_weights
    torch.testing.assert_close(full, weights)


def test_gap_weights_keep_the_order_whatever_the_capacities():
    gap = torch.tensor([0.0, 0.5, 1.0, 2.0, 4.0, 9.0])
    valid = torch.tensor([True, True, True, True, True, False])
    for capacity in (torch.tensor([0.99, 0.9, 0.5, 0.1, 0.01, 0.5]), torch.full((6,), 0.5), torch.zeros(6)):
        raw = gap_weights(gap, capacity, valid, valid.sum().float())
        assert (raw[:5][1:] >= raw[:5][:-1]).all() and (raw >= 1).all()
    steep = gap_weights(gap, torch.full((6,), 0.9), valid, torch.tensor(5.0))
    flat = gap_weights(gap, torch.full((6,), 0.1), valid, torch.tensor(5.0))
    assert (steep[1:5] > flat[1:5]).all()  # capacity sets the steepness only
    torch.testing.assert_close(gap_weights(gap, torch.zeros(6), valid, torch.tensor(5.0)), torch.ones(6))


def test_bounded_unit_mean():
    raw = torch.tensor([1e-9, 0.1, 1.0, 3.0, 1000.0, 7.0])
    valid = torch.tensor([True, True, True, True, True, False])
    w = bounded_unit_mean(raw, valid, 0.25, 4.0)
    assert w[valid].mean().item() == pytest.approx(1.0, abs=1e-6)
    assert w[5] == 0 and w[valid].min() >= 0.25 and w[valid].max() <= 4.0
    assert (w[:4] <= w[1:5]).all()
    torch.testing.assert_close(
        bounded_unit_mean(torch.full((5,), 3.0), torch.ones(5, dtype=torch.bool), 0.5, 2), torch.ones(5)
    )
    assert bounded_unit_mean(raw, torch.zeros(6, dtype=torch.bool), 0.5, 2.0).abs().sum() == 0
    with pytest.raises(ValueError, match="bounds"):
        bounded_unit_mean(raw, valid, 1.5, 2.0)


def test_blend_token_weights():
    w = torch.tensor([0.5, 1.5, 1.0])
    torch.testing.assert_close(blend_token_weights(w, 0.0), torch.ones(3))
    torch.testing.assert_close(blend_token_weights(w, 1.0), w)
    torch.testing.assert_close(blend_token_weights(w, 0.5), torch.tensor([0.75, 1.25, 1.0]))


def test_gradients_reach_router_and_student_not_sources():
    router = _router()
    student, sources, gap = _rows()
    sources.requires_grad_(True)
    gap.requires_grad_(True)
    out = router(student, sources, gap, top_k=2, temperature=1.0)
    (out.feature_loss + out.balance_loss + out.capacity_loss).backward()
    for name, param in router.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
        assert torch.isfinite(param.grad).all(), name
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert sources.grad is None and gap.grad is None


def test_capacity_probe_does_not_train_the_student():
    router = _router()
    student, sources, gap = _rows()
    router(student, sources, gap, top_k=2, temperature=1.0).capacity_loss.backward()
    assert student.grad is None
    assert router.capacity_head[0].weight.grad.abs().sum() > 0


def test_feature_loss_is_scale_free_and_bounded():
    """The loss does not grow with activation magnitudes or widths, so it cannot swamp the KD loss."""
    router = _router()
    student, sources, gap = _rows()
    base = router(student, sources, gap, top_k=2, temperature=1.0)
    scaled = router(student * 1000, sources * 1000 + 7, gap, top_k=2, temperature=1.0)
    torch.testing.assert_close(base.feature_loss, scaled.feature_loss, rtol=1e-4, atol=1e-4)
    # Rows are weighted by token weights of mean 1 and each row is in [0, 4].
    assert 0 <= base.feature_loss.item() <= 4.0


def test_padding_rows_change_nothing_and_all_padding_is_zero():
    router = _router()
    student, sources, gap = _rows(n=10)
    valid = torch.ones(13, dtype=torch.bool)
    valid[10:] = False
    garbage_student = torch.cat([student, torch.full((3, HS), float("nan"))])
    garbage_sources = torch.cat([sources, torch.full((3, E, HT), 1e30)])
    garbage_gap = torch.cat([gap, torch.full((3,), float("inf"))])
    plain = router(student, sources, gap, top_k=2, temperature=1.0)
    padded = router(garbage_student, garbage_sources, garbage_gap, top_k=2, temperature=1.0, valid=valid)
    for name in ("feature_loss", "balance_loss", "capacity_loss"):
        torch.testing.assert_close(getattr(plain, name), getattr(padded, name))
    torch.testing.assert_close(plain.token_weights, padded.token_weights[:10])
    assert (padded.token_weights[10:] == 0).all()

    padded.feature_loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in router.parameters() if p.grad is not None)

    nothing = router(
        garbage_student, garbage_sources, garbage_gap, 2, 1.0, valid=torch.zeros(13, dtype=torch.bool)
    )
    for value in (nothing.feature_loss, nothing.balance_loss, nothing.capacity_loss):
        assert value.item() == 0.0
    empty = router(student[:0], sources[:0], gap[:0], top_k=2, temperature=1.0)
    assert empty.feature_loss.item() == 0.0 and empty.token_weights.shape == (0,)


def test_count_divides_the_sums():
    router = _router()
    student, sources, gap = _rows()
    local = router(student, sources, gap, top_k=2, temperature=1.0)
    global_ = router(student, sources, gap, top_k=2, temperature=1.0, count=48)
    torch.testing.assert_close(global_.feature_loss, local.feature_loss * 12 / 48)


def test_state_dict_round_trip():
    router = _router()
    student, sources, gap = _rows()
    clone = StudentAwareRouter(HS, HT, E, dim=16, capacity_hidden=8)
    clone.load_state_dict(router.state_dict())
    a = router(student, sources, gap, top_k=3, temperature=0.5)
    b = clone(student, sources, gap, top_k=3, temperature=0.5)
    torch.testing.assert_close(a.feature_loss, b.feature_loss)
    torch.testing.assert_close(a.token_weights, b.token_weights)
    assert not any("temperature" in k or "scale" in k for k in router.state_dict())


def test_knowledge_gap_is_chunked_and_detached():
    g = torch.Generator().manual_seed(0)
    s_hidden = torch.randn(10, HS, generator=g, requires_grad=True)
    t_hidden = torch.randn(10, HT, generator=g)
    s_head, t_head = torch.randn(30, HS, generator=g, requires_grad=True), torch.randn(30, HT, generator=g)

    def kd(s_logits, t_logits):
        return forward_kl(s_logits, torch.log_softmax(t_logits, -1), 1.0)

    gap = knowledge_gap(s_hidden, t_hidden, s_head, t_head, kd, chunk_size=3)
    expected = kd(s_hidden @ s_head.T, t_hidden @ t_head.T)
    torch.testing.assert_close(gap, expected.detach())
    assert not gap.requires_grad and gap.shape == (10,)
    assert knowledge_gap(s_hidden[:0], t_hidden[:0], s_head, t_head, partial(kd)).shape == (0,)


def test_chunked_gap_cuts_every_teacher_input_into_the_same_chunks():
    """Without a teacher head (a cached teacher's rows): each chunk's student logits meet the same rows of
    every teacher input, as one unchunked evaluation does."""
    from sakd.models.head import as_head

    g = torch.Generator().manual_seed(1)
    s_hidden = torch.randn(10, HS, generator=g, requires_grad=True)
    s_head = as_head(torch.randn(30, HS, generator=g, requires_grad=True))
    ids, scale = torch.randint(0, 30, (10, 4), generator=g), torch.rand(10, generator=g)

    def kd(s_logits, ids, scale):
        return scale * torch.log_softmax(s_logits, -1).gather(1, ids).sum(-1)

    gap = chunked_gap(s_hidden, s_head, [ids, scale], kd, chunk_size=3)
    torch.testing.assert_close(gap, kd(s_hidden @ s_head.weight.T, ids, scale).detach())
    assert not gap.requires_grad and gap.shape == (10,)


def test_router_and_auxiliary_losses_on_a_real_cross_tokenizer_batch(assets):
    """The wiring the training objective uses: teacher experts and student states pooled onto the aligned
    groups of a packed batch (other tokenizers, lengths, widths): every loss finite, the student trained."""
    from transformers import AutoModelForCausalLM

    from sakd.data.packing import collate_windows, pack_windows
    from sakd.data.tokenize import tokenize_documents
    from sakd.losses.auxiliary import (
        attention_transfer_loss,
        contrastive_loss,
        default_layer_map,
        feature_loss,
        group_mean,
        layer_projections,
        layerwise_loss,
        pooled_groups,
    )
    from sakd.losses.kd import KDSettings, logit_kd
    from sakd.models.attention import capture_attentions
    from sakd.models.experts import knowledge_sources
    from sakd.models.load import capture_final_hidden, lm_head, load_tokenizer

    t_tok, s_tok = (
        load_tokenizer(str(assets["teacher"]), "teacher"),
        load_tokenizer(str(assets["student"]), "student"),
    )
    teacher = AutoModelForCausalLM.from_pretrained(assets["teacher"], attn_implementation="eager").eval()
    teacher.requires_grad_(False)
    student = AutoModelForCausalLM.from_pretrained(assets["student"], attn_implementation="eager")
    texts = [(assets["root"] / "train.jsonl").read_text()[i * 400 : (i + 1) * 400] for i in range(3)]
    windows = pack_windows(tokenize_documents(s_tok, texts), tokenize_documents(t_tok, texts), max_length=32)
    batch = collate_windows(windows[:3], s_tok.pad_token_id, t_tok.pad_token_id)
    align_mask, groups = batch.alignment.mask, batch.alignment.mask.shape[1]
    lengths = batch.student.attention_mask.sum(1), batch.teacher.attention_mask.sum(1)
    assert (lengths[0] != lengths[1]).any()

    sources = knowledge_sources(teacher, num_sources=4)
    with torch.no_grad(), sources, capture_attentions(teacher, detach=True) as t_attn:
        with capture_final_hidden(teacher) as t_final:
            t_out = teacher(
                input_ids=batch.teacher.input_ids,
                attention_mask=batch.teacher.attention_mask,
                output_hidden_states=True,
                logits_to_keep=1,
            )
    with capture_attentions(student) as s_attn, capture_final_hidden(student) as s_final:
        s_out = student(
            input_ids=batch.student.input_ids,
            attention_mask=batch.student.attention_mask,
            output_hidden_states=True,
            logits_to_keep=1,
        )
    s_hidden, t_hidden = s_final["hidden"], t_final["hidden"]  # (B, Ls, 32), (B, Lt, 48)
    hs, ht = s_hidden.shape[-1], t_hidden.shape[-1]
    assert (hs, ht) == (32, 48)

    # The gap at each aligned group's last positions, with the objective's own KD function.
    rows = torch.arange(align_mask.shape[0])[:, None].expand_as(align_mask)[align_mask]
    s_last = s_hidden[rows, batch.alignment.student_pos[align_mask]]  # (N, Hs)
    t_last = t_hidden[rows, batch.alignment.teacher_pos[align_mask]]  # (N, Ht)
    kd = logit_kd(KDSettings(), t_tok, s_tok)
    gap = knowledge_gap(s_last, t_last, lm_head(student).weight, lm_head(teacher).weight, kd.at(1.0))
    states, source_rows = aligned_group_states(
        s_hidden, batch.student.group, sources.sources, batch.teacher.group, align_mask
    )
    router = StudentAwareRouter(hs, ht, sources.num_sources, dim=16)
    routed = router(states, source_rows, gap, top_k=2, temperature=1.0)
    assert routed.token_weights.shape == gap.shape == (int(align_mask.sum()),)

    s_groups, _ = group_mean(s_hidden, batch.student.group, groups)  # (B, G, Hs)
    t_groups, _ = group_mean(t_hidden, batch.teacher.group, groups)  # (B, G, Ht)
    layer_map = default_layer_map(2, 2, 2)
    s_pooled, window_valid = pooled_groups(s_groups, align_mask)
    t_pooled, _ = pooled_groups(t_groups, align_mask)
    losses = {
        "router": routed.feature_loss + routed.capacity_loss,
        "balance": routed.balance_loss,
        "feature": feature_loss(states, t_groups[align_mask], torch.nn.Linear(hs, ht)),
        "attention": attention_transfer_loss(
            s_attn.maps[0], t_attn.maps[0], batch.student.group, batch.teacher.group, groups, align_mask
        ),
        "layerwise": layerwise_loss(
            s_out.hidden_states,
            t_out.hidden_states,
            layer_map,
            layer_projections(layer_map, hs, ht),
            batch.student.group,
            batch.teacher.group,
            align_mask,
        ),
        "contrastive": contrastive_loss(torch.nn.Linear(hs, ht)(s_pooled), t_pooled, 0.1, window_valid),
    }
    for name, value in losses.items():
        assert torch.isfinite(value) and value.item() > 0, name
    sum(losses.values()).backward()
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert student.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


def test_token_weights_only_path_equals_the_full_router():
    """The sources-free path gives the same token weights and capacity loss as a full router call."""
    import torch

    from sakd.router import StudentAwareRouter

    torch.manual_seed(0)
    router = StudentAwareRouter(student_hidden=12, source_hidden=20, num_sources=3, dim=8)
    states, sources, gap = torch.randn(9, 12), torch.randn(9, 3, 20), torch.rand(9)
    valid = torch.tensor([True] * 7 + [False] * 2)
    full = router(states, sources, gap, top_k=2, temperature=1.0, valid=valid, count=11)
    weights, capacity_loss = router.token_weights(states, gap, valid, count=11)
    torch.testing.assert_close(weights, full.token_weights)
    torch.testing.assert_close(capacity_loss, full.capacity_loss)
