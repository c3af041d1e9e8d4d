"""Quickstart: swap torch.optim.AdamW for cnl_ext.FusedCNLAdamW and watch a mastered loss stay put.

A small network first masters task M; then it is trained on an injection set I that contradicts M
on nearby inputs. Plain AdamW raises the loss on M step after step; FusedCNLAdamW, with the mean
gradient of M as its reference, moves only the elements that agree with it, and the loss on M does
not rise while the loss on I still falls.

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
    with torch.no_grad():
        result = {"loss on M (mastered)": mse(model(x_m), y_m).item(), "loss on I (injected)": mse(model(x_i), y_i).item()}
    if use_cnl:
        result["collaborative share (last step)"] = opt.cnl_stats().collaborative_share
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    for name, use_cnl in (("AdamW", False), ("FusedCNLAdamW", True)):
        print(f"{name:>14}: " + ", ".join(f"{k} {v:.4f}" for k, v in train(use_cnl, args.steps, args.lr, args.device).items()))


if __name__ == "__main__":
    main()
