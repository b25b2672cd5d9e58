"""`pkttrace` and `python -m tracer`: start what the kernel is slow to give,
then the command line (tracer/cli.py)."""
import sys

# Commands and options that never probe the kernel: no kallsyms read for them.
NOT_TRACING = frozenset({"cleanup", "diagram", "install-service", "lab", "replay",
                         "-h", "--help", "--version", "-r"})


def main() -> int:
    # A trace's start waits for /proc/kallsyms (~65 ms of kernel time):
    # read it beside the imports, which leave the other core idle.  (A run
    # that stops before probing, lacking root say, just drops the thread.)
    if not NOT_TRACING.intersection(sys.argv[1:]):
        from . import kallsyms, libbpf
        # before the thread's first malloc: a thread that allocates before
        # the limit gets an arena of its own, which glibc hands on to the
        # next thread (load_split's verifier) with the RSS it keeps
        libbpf.one_malloc_arena()
        kallsyms.prefetch()
    from .cli import run
    return run()


if __name__ == "__main__":
    sys.exit(main())
