"""torch.compile: the RecTok training forward + backward compiles with fullgraph=True and does not
recompile as the kept-token count changes (dynamo's counters prove it); inference compiles too."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from rectok_fast.models.rectok import RecTok, RecTokConfig


def _model(**kw) -> RecTok:
    torch.manual_seed(0)
    cfg = dict(
        img_size=64,
        token_channels=8,
        encoder=(64, 1, 2),
        decoder=(64, 1, 2),
        sem_decoder=(32, 1, 2),
        teachers={"tiny": 32},
    )
    cfg.update(kw)
    return RecTok(RecTokConfig(**cfg)).train()


def _loss(model, images, mask, feats, t=None, noise=None):
    out = model(images, mask=mask, t=t, noise=noise, teacher_features=feats)
    return (out.reconstruction - images).pow(2).mean() + 1e-6 * out.kl + out.sem_loss


def test_training_step_fullgraph_no_recompile():
    torch._dynamo.reset()
    model = _model()
    N = model.config.num_tokens
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    feats = {"tiny": torch.randn(2, N, 32)}
    _loss(model, x, model.sample_mask(2, num_kept=12), feats).backward()  # eager warm-up (records backends)
    model.zero_grad()
    cnt = CompileCounterWithBackend("aot_eager")
    step = torch.compile(_loss, fullgraph=True, backend=cnt)
    # kept counts include N (nothing masked: N-K = 0) and N-1 (N-K = 1), which specialise if handled naively
    for K in (12, N, 10, N - 1, 11):
        mask = model.sample_mask(2, num_kept=K)
        t = torch.rand(2)
        noise = (torch.randn(2, K, 8), torch.randn(2, K, 8))
        for n in noise:  # explicit noise follows K too (sample_mask marks ids_keep itself)
            torch._dynamo.maybe_mark_dynamic(n, 1)
        loss = step(model, x, mask, feats, t, noise)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad()
        ref = _loss(model, x, mask, feats, t, noise)
        ref.backward()
        torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
        for n, p in model.named_parameters():
            torch.testing.assert_close(grads[n], p.grad, atol=1e-5, rtol=1e-4, msg=n)
        model.zero_grad()
    assert cnt.frame_count == 1, f"recompiled: {cnt.frame_count} graphs for 5 mask ratios"


def test_training_mask_drawn_under_compile_is_rejected():
    model = _model()
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    f = torch.compile(lambda m, im: m(im).reconstruction, fullgraph=True, backend="eager")
    with pytest.raises(Exception, match="sample_mask"):
        f(model, x)


def test_inference_compiles_fullgraph():
    torch._dynamo.reset()
    model = _model().eval()
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    cnt = CompileCounterWithBackend("eager")
    tok = torch.compile(model.tokenize, fullgraph=True, backend=cnt)
    detok = torch.compile(model.detokenize, fullgraph=True, backend=cnt)
    with torch.no_grad():
        tokens = tok(x)
        torch.testing.assert_close(tokens, model.tokenize(x))
        torch.testing.assert_close(detok(tokens), model.detokenize(tokens))
        detok(tokens + 1)
    assert cnt.frame_count == 2


@pytest.mark.cuda_only
def test_training_step_inductor_cuda_no_recompile():
    torch._dynamo.reset()
    model = _model().cuda()
    N = model.config.num_tokens
    x = torch.rand(2, 3, 64, 64, device="cuda") * 2 - 1
    feats = {"tiny": torch.randn(2, N, 32, device="cuda")}
    _loss(model, x, model.sample_mask(2, num_kept=12), feats).backward()
    cnt = CompileCounterWithBackend("inductor")
    step = torch.compile(_loss, fullgraph=True, backend=cnt)
    for K in (12, N, 10, N - 1):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = step(model, x, model.sample_mask(2, num_kept=K), feats)
        loss.backward()
        assert torch.isfinite(loss)
    assert cnt.frame_count == 1
