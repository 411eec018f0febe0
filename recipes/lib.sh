# Shared by the recipes (sourced, not run): checks, data flags and the launch itself.
# shellcheck shell=bash

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# Makes layer_specs/ and megacpp_mcore importable from a source checkout without `pip install`.
# shellcheck disable=SC2034  # used by the recipes that source this file
PYTHONPATH_WITH_REPO="$REPO${PYTHONPATH:+:$PYTHONPATH}"

require_file() {  # require_file PATH WHAT: exit 2 naming WHAT when PATH does not exist
  if [[ ! -e $1 ]]; then
    echo "error: $2 not found: $1" >&2
    exit 2
  fi
}

require_switch() {  # require_switch NAME...: each variable NAME must be 0 or 1 (exit 2 naming it)
  local name
  for name in "$@"; do
    if [[ ${!name} != 0 && ${!name} != 1 ]]; then
      echo "error: $name=${!name}: allowed: 0 or 1" >&2
      exit 2
    fi
  done
}

require_count() {  # require_count MIN NAME...: each variable NAME must be an integer >= MIN (exit 2)
  local min=$1 name
  shift
  for name in "$@"; do
    if [[ ! ${!name} =~ ^[0-9]+$ ]] || (( 10#${!name} < min )); then
      echo "error: $name=${!name}: allowed: an integer >= $min" >&2
      exit 2
    fi
  done
}

require_megatron_lm() {  # require_megatron_lm DIR: a Megatron-LM checkout (core_v0.16.1 .. core_v0.19.0)
  require_file "$1/pretrain_gpt.py" "Megatron-LM checkout (set MEGATRON_LM; git clone --branch core_v0.19.0 https://github.com/NVIDIA/Megatron-LM for megatron-core 0.19.x, --branch core_v0.16.1 for 0.16.1)"
  describe_megatron_lm "$1"
}

describe_megatron_lm() {  # describe_megatron_lm DIR: says on stderr which checkout and release line it is
  # (the launcher's own reading of megatron/core/package_info.py; stdout stays the command alone)
  PYTHONPATH="$PYTHONPATH_WITH_REPO" python -c \
    'import sys; from megacpp_mcore.upstream.launch_pretrain import describe_checkout; print(describe_checkout(sys.argv[1]))' \
    "$1" >&2 || echo "Megatron-LM checkout $1: version unknown (python could not read it)" >&2
}

set_data_args() {  # set_data_args PREFIX: DATA_ARGS for a Megatron data prefix, mock data when empty
  # shellcheck disable=SC2034  # DATA_ARGS is read by the recipe that calls this
  if [[ -z $1 ]]; then
    DATA_ARGS=(--mock-data)
  else
    require_file "$1.bin" "data prefix (DATA)"
    require_file "$1.idx" "data prefix (DATA)"
    DATA_ARGS=(--data-path "$1")
  fi
}

set_tokenizer_args() {  # set_tokenizer_args PREFIX VOCAB: TOKENIZER for pretrain_gpt.py
  # The byte-level BPE that `megacpp-mcore prepare-data --tokenizer bpe:N --output X` saved beside the
  # data (X.tokenizer/; PREFIX is X.train or X.valid): Megatron's HuggingFaceTokenizer reads it, and
  # the vocabulary is its size, padded by Megatron. Otherwise NullTokenizer, which adds an
  # end-of-document id: VOCAB - 1 ids + EOD = VOCAB (a multiple of 128).
  local base=${1%.train}
  base=${base%.valid}
  # shellcheck disable=SC2034  # TOKENIZER is read by the recipe that calls this
  if [[ -n $1 && -f $base.tokenizer/tokenizer.json ]]; then
    TOKENIZER=(--tokenizer-type HuggingFaceTokenizer --tokenizer-model "$base.tokenizer")
  else
    TOKENIZER=(--tokenizer-type NullTokenizer --vocab-size "$(($2 - 1))")
  fi
}

check_train_flags() {  # check_train_flags FLAGS...: `megacpp-mcore train`'s parser on FLAGS before
  # anything starts (or a --dry-run prints): a bad flag exits 2 with argparse's one-line message,
  # not a torchrun traceback per rank after the output directory was made
  PYTHONPATH="$PYTHONPATH_WITH_REPO" python -c \
    'import sys; from megacpp_mcore.cli import _parser; _parser().parse_args(["train", *sys.argv[1:]])' \
    "$@" >/dev/null || exit 2
}

check_megatron_flags() {  # check_megatron_flags DRY_RUN CHECKOUT FLAGS...: Megatron-LM's parser
  # (with the package's flags) on FLAGS once, before torchrun starts its ranks or a --dry-run prints:
  # a bad flag exits 2 with one line. Where the check cannot run on this host (the checkout's parser
  # does not import: the launcher's exit 3 and one line; or python cannot run the launcher), a dry
  # run says so and prints the command unchecked, a launch stops (exit 2)
  local rc=0
  PYTHONPATH="$PYTHONPATH_WITH_REPO" python -m megacpp_mcore.launch_pretrain --check-flags \
    --megatron-lm "$2" "${@:3}" || rc=$?
  case $rc in
    0) ;;
    2) exit 2 ;;
    3) (( $1 )) || exit 2 ;;
    *) (( $1 )) || exit 2
       echo "flags not checked: python -m megacpp_mcore.launch_pretrain --check-flags failed (exit $rc)" >&2 ;;
  esac
}

launch() {  # launch DRY_RUN OUT_DIR CMD...: print CMD (DRY_RUN=1) or create OUT_DIR and exec CMD
  local dry_run=$1 out=$2
  shift 2
  if (( dry_run )); then
    printf '%q ' "$@"
    echo
    exit 0
  fi
  mkdir -p "$out"
  exec "$@"
}
