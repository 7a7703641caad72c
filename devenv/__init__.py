"""The developers' environment: the lock file's pins (`lockfile`, read before anything is installed, standard library
only), the check that every component of the set-up imports and works (`envcheck`, `make check-env`), and the check
that every command the README and docs/ show runs (`docs_check` over `docs_pages`, with `docs_standin`'s stand-ins
for object stores and SLURM; `make docs-check`). Standard library only."""
