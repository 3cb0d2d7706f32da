from benchmarks.gpu_run.cli import run

if __name__ == "__main__":
    run()
