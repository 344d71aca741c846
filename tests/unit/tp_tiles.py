"""Run under torchrun with two ranks (tests/unit/test_kd_tiles.py): each rank holds half of the
padded vocabulary's columns and must get the one-rank losses, and its own columns' gradient.
Prints "tp_tiles ok" per rank."""
import torch
import torch.distributed as dist

from recipes.lib import kd_tiles


def check(vocab: int, padded: int, temperature: float) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(7)
    s = torch.randn(23, padded, generator=g) * 3
    t = torch.randn(23, padded, generator=g) * 3
    y = torch.randint(0, vocab, (23,), generator=g)
    w = torch.rand(23, generator=g)
    whole = s.clone().requires_grad_()
    kl1, nll1 = kd_tiles.tiled_losses(whole, t, y, vocab, temperature)
    ((kl1 + 0.5 * nll1) * w).sum().backward()
    width = padded // world
    cols = slice(rank * width, (rank + 1) * width)
    part = s[:, cols].clone().requires_grad_()
    kl, nll = kd_tiles.tiled_losses(part, t[:, cols].clone(), y, vocab, temperature,
                                    start=rank * width, group=dist.group.WORLD)
    ((kl + 0.5 * nll) * w).sum().backward()
    torch.testing.assert_close(kl, kl1, rtol=2e-6, atol=5e-6)
    torch.testing.assert_close(nll, nll1, rtol=2e-6, atol=5e-6)
    torch.testing.assert_close(part.grad, whole.grad[:, cols], rtol=1e-5, atol=1e-7)


def main() -> None:
    dist.init_process_group("gloo")
    kd_tiles.BLOCK = 128  # several tiles per rank
    for vocab, padded, temperature in ((1000, 1024, 2.0), (500, 1024, 1.0)):
        check(vocab, padded, temperature)  # (500, 1024): rank 1 holds padding alone
    print(f"tp_tiles ok rank {dist.get_rank()}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
