"""The `chip` command run in this process, and what it printed."""

from chipprune.cli import main


def run(capsys, *args):
    """(exit code, stdout, stderr) of `chip ARGS` run in this process."""
    try:
        code = main([str(a) for a in args])
    except SystemExit as e:  # argparse's own exits: usage errors, --help, --version
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err
