"""The developers' environment: the lock file's pins (`lockfile`, read before anything is installed, standard library
only) and the check that every component of the set-up imports and works (`envcheck`, `make check-env`)."""
