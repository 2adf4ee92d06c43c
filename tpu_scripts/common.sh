# shellcheck shell=bash
# Shared option parsing and command running for the TPU pod scripts.
# Written for bash 3.2 too (macOS): no associative arrays, no ${var@Q}.

# Defaults come from the environment so a session can `export TPU_NAME=...` once.
TPU_NAME="${TPU_NAME:-}"
TPU_ZONE="${TPU_ZONE:-}"
TPU_PROJECT="${TPU_PROJECT:-}"
DRY_RUN=0
HELP=0
PASSTHROUGH=()
# Scripts that hand words after "--" to a program (launch.sh) set this to 1 before parse_args;
# elsewhere such words are an error rather than silently dropped.
ACCEPTS_PASSTHROUGH=0

# "option=VARIABLE" words; each script appends its own before parse_args.
OPTIONS="name=TPU_NAME zone=TPU_ZONE project=TPU_PROJECT"
FLAGS="dry-run=DRY_RUN help=HELP"

die() {
  printf '%s: error: %s\n' "${0##*/}" "$1" >&2
  exit 2
}

# Prints the variable mapped to option $1 in the word list $2.
lookup() {
  local entry
  for entry in $2; do
    if [ "${entry%%=*}" = "$1" ]; then
      printf '%s' "${entry#*=}"
      return 0
    fi
  done
  return 1
}

# Parses --option VALUE, --option=VALUE, --flag, and (where the script accepts
# them) everything after "--" into PASSTHROUGH. Prints USAGE (set by the script)
# for -h/--help. A value that looks like an option (--name --dry-run) is an error.
parse_args() {
  local key var
  while [ $# -gt 0 ]; do
    case "$1" in
      --)
        shift
        if [ "$ACCEPTS_PASSTHROUGH" != 1 ] && [ $# -gt 0 ]; then
          die "unexpected arguments after --: $(quote_words "$@")"
        fi
        # shellcheck disable=SC2034  # read by the scripts that source this file
        PASSTHROUGH=("$@")
        break
        ;;
      -h) HELP=1; shift ;;
      --*=*)
        key="${1%%=*}"
        key="${key#--}"
        var="$(lookup "$key" "$OPTIONS")" || die "unknown option --$key (see --help)"
        printf -v "$var" '%s' "${1#*=}"
        shift
        ;;
      --*)
        key="${1#--}"
        if var="$(lookup "$key" "$FLAGS")"; then
          printf -v "$var" '%s' 1
          shift
        elif var="$(lookup "$key" "$OPTIONS")"; then
          [ $# -ge 2 ] || die "--$key needs a value"
          case "$2" in
            -*) die "--$key needs a value (got the option '$2'; write --$key=VALUE for a value starting with -)" ;;
          esac
          printf -v "$var" '%s' "$2"
          shift 2
        else
          die "unknown option $1 (see --help)"
        fi
        ;;
      *) die "unexpected argument '$1' (arguments for the program go after --)" ;;
    esac
  done
  if [ "$HELP" = 1 ]; then
    printf '%s\n' "$USAGE"
    printf '\nCommon options:\n%s\n' "$COMMON_USAGE"
    exit 0
  fi
}

COMMON_USAGE="  --name NAME       TPU VM name (default: \$TPU_NAME)
  --zone ZONE       zone, e.g. us-central2-b (default: \$TPU_ZONE)
  --project ID      Google Cloud project (default: \$TPU_PROJECT, else gcloud's)
  --dry-run         print the commands instead of running them
  -h, --help        show this help"

# Cloud TPU names: a lowercase letter, then up to 62 lowercase letters, digits or
# hyphens, not ending with a hyphen. Zones look like us-central2-b.
NAME_RULE='^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$'
ZONE_RULE='^[a-z]+-[a-z]+[0-9]+-[a-z]$'

# Fails unless --name and --zone are known and well-formed; then sets GCLOUD_FLAGS.
require_tpu() {
  [ -n "$TPU_NAME" ] || die "missing --name (or set TPU_NAME)"
  [ -n "$TPU_ZONE" ] || die "missing --zone (or set TPU_ZONE)"
  [[ "$TPU_NAME" =~ $NAME_RULE ]] ||
    die "--name '$TPU_NAME' is not a Cloud TPU name: a lowercase letter, then up to 62 lowercase letters, digits or hyphens, not ending with a hyphen"
  [[ "$TPU_ZONE" =~ $ZONE_RULE ]] || die "--zone '$TPU_ZONE' is not a zone (e.g. us-central2-b)"
  GCLOUD_FLAGS=("--zone=$TPU_ZONE")
  if [ -n "$TPU_PROJECT" ]; then
    GCLOUD_FLAGS+=("--project=$TPU_PROJECT")
  fi
}

# Quotes one word for a POSIX shell; plain words stay bare for readability.
quote() {
  local q="'\\''"
  case "$1" in
    '' | *[!A-Za-z0-9_./:=@%+,-]*) printf "'%s'" "${1//\'/$q}" ;;
    *) printf '%s' "$1" ;;
  esac
}

# Prints a command line that a shell would split back into exactly "$@".
quote_words() {
  local word line=""
  for word in "$@"; do
    line="$line${line:+ }$(quote "$word")"
  done
  printf '%s\n' "$line"
}

# Runs a command, or prints it with --dry-run.
run() {
  if [ "$DRY_RUN" = 1 ]; then
    quote_words "$@"
  else
    "$@"
  fi
}

# Checks gcloud is installed unless only printing.
require_gcloud() {
  if [ "$DRY_RUN" != 1 ] && ! command -v gcloud >/dev/null 2>&1; then
    die "gcloud not found: install the Google Cloud CLI and run 'gcloud auth login'"
  fi
}
