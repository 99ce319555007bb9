#!/bin/bash
# callgrind wrapper for --hub-bin: BIN and OUT from the environment
exec valgrind --tool=callgrind --separate-threads=yes --callgrind-out-file=$CGOUT/cg.%p "$CGBIN" "$@"
