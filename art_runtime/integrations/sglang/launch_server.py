"""``art-sglang`` / ``python -m art_runtime.integrations.sglang.launch_server``: SGLang's server with ART options.

Takes every argument of ``python -m sglang.launch_server`` plus the ``--art-*`` options
(``--help`` lists both). The ART options are taken out before SGLang parses the rest, written
into the environment (``ART_*``), from where every process of the server reads them, and
validated here, so a bad value stops the launch before any model loads.
"""

from __future__ import annotations

import argparse
import os
import sys

from .options import add_cli_args, resolve_options, split_argv


def prepare(argv: list[str]):
    """Strip and validate the ART options, export them, and parse the rest as SGLang would.

    Parameters
    ----------
    argv : list of str
        The command line without the program name.

    Returns
    -------
    sglang.srt.server_args.ServerArgs

    Raises
    ------
    ValueError
        A bad ART option (named), or a server setup ART cannot run.
    """
    art_env, sglang_argv = split_argv(argv)
    resolve_options({**os.environ, **art_env})  # fail before touching the environment
    os.environ.update(art_env)
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS
    from sglang.srt.plugins import load_plugins
    from sglang.srt.server_args import prepare_server_args

    from . import BACKEND_NAME, uses_art

    load_plugins()  # runs art-runtime's entry point, as every scheduler process will
    if BACKEND_NAME not in ATTENTION_BACKENDS:
        raise ValueError("SGLang did not load art-runtime's plugin (entry point group sglang.srt.plugins): "
                         "install art-runtime with pip, and leave 'art' in SGLANG_PLUGINS if you set it")
    server_args = prepare_server_args(sglang_argv)  # validates the ART setup (the plugin's hook)
    if art_env and not uses_art(server_args):
        raise ValueError(f"{sorted(art_env)} given, but the server does not use ART: "
                         "pass --attention-backend art (or --decode-attention-backend art)")
    return server_args


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if any(arg in ("-h", "--help") for arg in argv):
        parser = argparse.ArgumentParser(prog="art-sglang", description=__doc__.split("\n\n")[1],
                                         epilog="Every other argument goes to SGLang: see "
                                                "python -m sglang.launch_server --help.")
        add_cli_args(parser)
        parser.print_help()
        return
    try:
        server_args = prepare(argv)
    except ValueError as exc:
        sys.exit(f"art-sglang: {exc}")
    from sglang.launch_server import run_server
    from sglang.srt.utils import kill_process_tree

    try:
        run_server(server_args)
    finally:
        kill_process_tree(os.getpid(), include_parent=False)


if __name__ == "__main__":
    main()
