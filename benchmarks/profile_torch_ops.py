"""PyTorch's side of "where the time goes": torch.profiler's op table for the PyTorch twin of mnist_cnn
(jaxcnn.interop.torch_module), batch 128, SGD momentum, 2 threads, 10 profiled steps after 5 warm-up steps.

    python benchmarks/profile_torch_ops.py
"""

import torch

from jaxcnn import models
from jaxcnn.interop.torch import torch_module

torch.set_num_threads(2)
model = models.mnist_cnn()

m = torch_module(model, (28, 28, 1))
opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
x = torch.randn(128, 1, 28, 28)
y = torch.randint(0, 10, (128,))


def step() -> None:
    opt.zero_grad()
    loss = torch.nn.functional.cross_entropy(m(x), y)
    loss.backward()
    opt.step()


for _ in range(5):
    step()
from torch.profiler import ProfilerActivity, profile  # noqa: E402

with profile(activities=[ProfilerActivity.CPU]) as prof:
    for _ in range(10):
        step()
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14))
