"""Quickstart: swap torch.optim.AdamW for cnl_ext.FusedCNLAdamW and compare what each does to a mastered task.

A small network first masters task M (its loss on M is 0); then it is trained on an injection set I
that contradicts M on nearby inputs. Plain AdamW lowers the loss on I and raises the loss on M;
FusedCNLAdamW, with the mean gradient of M as its reference, moves only the elements that agree
with it: the loss on M rises far less (about 30 times less with the defaults), and the loss on I
still falls, more slowly. The script prints both losses before and after, and the ratio.

    python examples/quickstart.py [--steps 30] [--lr 1e-3] [--device cpu|cuda]
"""
import argparse

import torch

import cnl_ext


def make_tasks(device):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1)).to(device)
    x_m = torch.randn(256, 8, device=device)
    with torch.no_grad():
        y_m = model(x_m)  # the model masters M exactly
    x_i = x_m[:32] + 0.1 * torch.randn(32, 8, device=device)
    y_i = 1.0 - y_m[:32]  # I contradicts M on nearby inputs
    return model, (x_m, y_m), (x_i, y_i)


def train(use_cnl, steps, lr, device):
    model, (x_m, y_m), (x_i, y_i) = make_tasks(device)
    mse = torch.nn.functional.mse_loss

    def losses():
        with torch.no_grad():
            return mse(model(x_m), y_m).item(), mse(model(x_i), y_i).item()

    before = losses()
    if use_cnl:
        opt = cnl_ext.FusedCNLAdamW(model.parameters(), lr=lr, weight_decay=0.1, track_stats=True)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    for step in range(1, steps + 1):
        if use_cnl and step % 5 == 1:  # refresh the reference now and then (each epoch, in the paper)
            with opt.capture_reference() as ref:
                for batch in range(0, len(x_m), 64):
                    ref.backward(mse(model(x_m[batch:batch + 64]), y_m[batch:batch + 64]))
        opt.zero_grad()
        mse(model(x_i), y_i).backward()
        opt.step()
    share = opt.cnl_stats().collaborative_share if use_cnl else None
    return before, losses(), share


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    print(f"loss on M (mastered) and on I (injected), before -> after {args.steps} steps:")
    after_m = {}
    for name, use_cnl in (("AdamW", False), ("FusedCNLAdamW", True)):
        (m0, i0), (m1, i1), share = train(use_cnl, args.steps, args.lr, args.device)
        after_m[name] = m1
        extra = f" (collaborative share at the last step {100 * share:.1f}%)" if share is not None else ""
        print(f"{name:>14}: M {m0:.4f} -> {m1:.4f}, I {i0:.4f} -> {i1:.4f}{extra}")
    if after_m["FusedCNLAdamW"] < after_m["AdamW"]:
        ratio = after_m["AdamW"] / after_m["FusedCNLAdamW"] if after_m["FusedCNLAdamW"] > 0 else float("inf")
        print(f"the mastered loss after CNL is {ratio:.0f}x lower than after AdamW")
    else:
        print("the mastered loss after CNL is NOT lower than after AdamW here")


if __name__ == "__main__":
    main()
