"""Thread safety: concurrent forward (and backward) passes of merged and unmerged goft models equal sequential ones."""

import copy
import threading

import pytest
import torch

import goft

from tiny_models import build, perturb_adapters

THREADS, ROUNDS = 6, 4


def _models():
    unmerged = build("llama")
    goft.inject(unmerged, variant="qgoft")
    perturb_adapters(unmerged, 0.2)
    merged = copy.deepcopy(unmerged)
    goft.merge(merged)
    strict = build("llama")
    goft.inject(strict, scale=True)
    perturb_adapters(strict, 0.2, seed=1)
    return {"unmerged": unmerged, "merged": merged, "strict": strict, "unloaded": goft.merge_and_unload(copy.deepcopy(strict))}


def _inputs(i: int) -> torch.Tensor:
    # Different shapes per call, so concurrent calls of the op differ in rows (and the models'
    # shapes in sequence length).
    g = torch.Generator().manual_seed(i)
    return torch.randint(0, 100, (1 + i % 3, 5 + i % 4), generator=g)


def _forward(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _run_concurrently(work):
    """Runs work(thread_index) on THREADS threads started together; re-raises the first error."""
    barrier = threading.Barrier(THREADS)
    errors = []

    def body(t):
        try:
            barrier.wait()
            work(t)
        except BaseException as e:  # noqa: BLE001 - reported to the main thread
            errors.append(e)

    threads = [threading.Thread(target=body, args=(t,)) for t in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads), "a thread hung"
    if errors:
        raise errors[0]


def test_concurrent_forward_passes_equal_sequential_ones():
    models = _models()
    names = list(models)
    jobs = [(names[(t + r) % len(names)], t * ROUNDS + r) for t in range(THREADS) for r in range(ROUNDS)]
    expected = {(name, i): _forward(models[name], _inputs(i)) for name, i in jobs}
    # Merged and unmerged compute the same function (up to rounding): the pairs are meaningful.
    for (name, i), logits in expected.items():
        twin = {"merged": "unmerged", "unloaded": "strict"}.get(name)
        if twin:
            torch.testing.assert_close(logits, _forward(models[twin], _inputs(i)), rtol=1e-4, atol=1e-5)
    results = {}

    def work(t):
        for r in range(ROUNDS):
            name, i = jobs[t * ROUNDS + r]
            results[name, i] = _forward(models[name], _inputs(i))

    _run_concurrently(work)
    assert set(results) == set(expected)
    for key, value in expected.items():
        assert torch.equal(results[key], value), f"{key} differs when run concurrently"


def test_concurrent_backward_passes_equal_sequential_ones():
    # Gradients of separate graphs, one per thread, through the same (shared) adapter parameters.
    model = _models()["unmerged"]
    params = [p for p in model.parameters() if p.requires_grad]

    def grads(i):
        ids = _inputs(i)
        loss = model(input_ids=ids, labels=ids).loss + goft.orthogonality_penalty(model)
        return torch.autograd.grad(loss, params)

    expected = [grads(i) for i in range(THREADS)]
    results = [None] * THREADS

    def work(t):
        results[t] = grads(t)

    _run_concurrently(work)
    for t in range(THREADS):
        assert all(torch.equal(a, b) for a, b in zip(results[t], expected[t])), f"thread {t}"


@pytest.mark.parametrize("d", [7, 768, 1000])
def test_concurrent_op_calls_with_different_shapes_and_variants(d):
    g = torch.Generator().manual_seed(d)
    calls = []
    for t in range(THREADS):
        x = torch.randn(50 + 37 * t, d, generator=g)
        params = torch.randn(d - 1, generator=g) if t % 2 else torch.eye(2) + 0.3 * torch.randn(d - 1, 2, 2, generator=g)
        scale = torch.rand(d, generator=g) + 0.5 if t % 3 == 0 and t % 2 else None
        calls.append((x, params, scale, t % 4 == 1))
    expected = [goft.rotate(*call) for call in calls]
    results = [None] * THREADS

    def work(t):
        for _ in range(ROUNDS):
            results[t] = goft.rotate(*calls[t])
            assert torch.equal(results[t], expected[t])

    _run_concurrently(work)
