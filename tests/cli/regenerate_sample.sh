#!/usr/bin/env bash
# regenerate_sample.sh KVSCOPE SAMPLE ARGS_FILE OUT
# The bundled sample must be exactly what `make sample` writes: synthesis and
# the writer are deterministic down to the byte.
set -eu
kvscope=$1 sample=$2 args=$3 out=$4
# shellcheck disable=SC2046  # the args file is a flat list of flags
"$kvscope" synth --out "$out" $(cat "$args") >/dev/null
if ! cmp "$sample" "$out"; then
  echo "regenerated sample differs from $sample: run 'make sample' and commit it"
  exit 1
fi
echo "sample regenerates byte for byte"
