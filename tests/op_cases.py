"""The tables of convolution and pooling cases that the functional tests and the PyTorch comparisons share."""

import numpy as np


def conv_cases() -> list[tuple]:
    """Odd sizes, non-square kernels 1-5, stride 1-3, dilation 1-3, groups 1/2/3, every padding spelling,
    batch 1 and 3: hand-picked edge cases plus a seeded random sample of the product."""
    cases = [
        # (batch, H, W, C, F, (kh, kw), stride, padding, dilation, groups, bias)
        (1, 5, 5, 1, 1, (1, 1), 1, "VALID", 1, 1, True),
        (3, 7, 9, 3, 6, (3, 2), 1, "SAME", 1, 1, True),
        (3, 8, 7, 4, 4, (3, 3), 2, ((1, 2), (0, 3)), 1, 2, True),
        (1, 9, 9, 3, 3, (2, 5), 3, 2, 2, 3, False),  # depthwise, int padding
        (3, 10, 11, 6, 6, (3, 3), (2, 3), "SAME", (2, 1), 6, True),  # depthwise, SAME, strided, dilated
        (1, 6, 6, 1, 2, (2, 2), 1, ((3, 0), (0, 4)), 1, 1, True),  # padding larger than the kernel
        (3, 5, 5, 2, 2, (1, 1), 1, 3, 1, 1, True),
        (1, 4, 4, 3, 3, (4, 4), 1, "VALID", 1, 1, True),  # kernel as large as the input
        (3, 11, 7, 2, 4, (5, 3), 3, "SAME", 3, 2, True),
        (1, 13, 13, 3, 2, (3, 5), (1, 2), ((0, 2), (2, 1)), (3, 2), 1, False),
    ]
    rng = np.random.default_rng(1234)
    paddings = ["SAME", "VALID", 0, 1, 2, ((0, 1), (2, 0)), ((1, 2), (1, 1)), ((2, 0), (0, 1))]
    while len(cases) < 40:
        groups = int(rng.choice([1, 2, 3]))
        channels = groups * int(rng.integers(1, 3))
        features = groups * int(rng.integers(1, 3))
        kernel = (int(rng.integers(1, 6)), int(rng.integers(1, 6)))
        stride = (int(rng.integers(1, 4)), int(rng.integers(1, 4)))
        dilation = (int(rng.integers(1, 4)), int(rng.integers(1, 4)))
        padding = paddings[int(rng.integers(len(paddings)))]
        height, width = int(rng.integers(5, 14)) | 1, int(rng.integers(5, 14))
        effective = [(k - 1) * d + 1 for k, d in zip(kernel, dilation, strict=True)]
        if effective[0] > height or effective[1] > width:
            continue
        batch = int(rng.choice([1, 3]))
        cases.append(
            (batch, height, width, channels, features, kernel, stride, padding, dilation, groups, bool(rng.integers(2)))
        )
    return cases


CONV_CASES = conv_cases()


POOL_CASES = [
    # (batch, H, W, C, window, stride, padding)
    (1, 6, 6, 1, 2, None, "VALID"),
    (3, 7, 9, 2, 2, None, "VALID"),
    (3, 7, 9, 3, 3, 2, "SAME"),
    (1, 8, 8, 2, (3, 2), (1, 2), ((1, 2), (0, 1))),
    (3, 5, 5, 1, 3, 1, 1),
    (1, 9, 7, 2, (2, 3), 3, "SAME"),
    (3, 11, 10, 2, 4, (2, 3), ((3, 0), (1, 2))),
    (1, 5, 5, 3, 5, 1, "VALID"),
    (3, 6, 5, 2, (1, 3), (1, 1), "SAME"),
    (1, 13, 11, 1, 3, (3, 1), 2),
]
