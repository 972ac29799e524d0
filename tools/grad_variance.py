#!/usr/bin/env python
"""The variance of the gradients of EnSiam and SimSiam K-aug (the paper's Section 3.3, equations 6-9).

    python tools/grad_variance.py --views 2,4,8 --draws 32 --batch-size 64 --seed 0        # random init
    python tools/grad_variance.py --run runs/demo --views 2,4,8 --draws 32 --plot gv.png   # trained

For a fixed batch of real images, M independent draws of K views through the real augmentation
pipeline; per draw the gradient of each loss on the same views; the trace of the gradient covariance
(total, backbone, projector, predictor) with bootstrap intervals, and each method's target variance.
The last line printed is one JSON object. The work is done by ``ensiam_fast.analysis.gradvar``
(estimator) and ``ensiam_fast.analysis.gradvar_cli`` (data, network, plot).
"""

from __future__ import annotations

import sys

import common  # noqa: F401  (tools/common.py: the checkout first on sys.path)

from ensiam_fast.analysis.gradvar_cli import main

if __name__ == "__main__":
    sys.exit(main())
