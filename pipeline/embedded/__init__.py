"""embedded"""

DEMO_WORKDIR = "internvl-batch-demo"  # the demo's folder under the current one, kept between runs (model built once)
