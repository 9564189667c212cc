"""Train a small torch model with uniopt's QHAdam (a drop-in for qhoptim.pyt.QHAdam).

Run: python examples/torch_qhadam_regression.py
"""

import torch

from uniopt.adapters.torch import QHAdam

torch.manual_seed(0)
x = torch.randn(512, 8)
y = torch.sin(x.sum(dim=1, keepdim=True))
model = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
opt = QHAdam(model.parameters(), lr=3e-3, betas=(0.995, 0.999), nus=(0.7, 1.0), weight_decay=1e-4,
             decouple_weight_decay=True)
scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=400)
for step in range(400):
    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    loss = opt.step(closure)
    scheduler.step()
    if step % 100 == 0 or step == 399:
        print(f"step {step:3d}  loss {loss.item():.5f}")
# The claim, checked by the tests: the fit explains most of the variance of y (predicting the
# mean of y would score a loss of var(y)).
with torch.no_grad():
    final = torch.nn.functional.mse_loss(model(x), y).item()
print(f"result final_loss={final:.6f} variance={y.var(unbiased=False).item():.6f}")
