"""The GPU run of issue 25: one script that trains IC-PolypSeg-Lite0 on the PraNet protocol with the paper's recipe,
evaluates it with the project's evaluation and times the inference back-ends, inside one device call; smoke-tested
on the CPU (``--device cpu --smoke``). See benchmarks/README.md, "GPU run"."""
