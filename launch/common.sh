# What the launch scripts share; sourced, not run.

# The value of --workdir (as --workdir=DIR or --workdir DIR) among the flowjax.main flags given; empty if none.
workdir_flag() {
  local arg previous= found=
  for arg in "$@"; do
    case $arg in
      --workdir=*) found=${arg#--workdir=} ;;
      *) [[ $previous == --workdir ]] && found=$arg ;;
    esac
    previous=$arg
  done
  echo "$found"
}

# The Python to run flowjax with: $PYTHON, else the repository's .venv/bin/python (root: $1), else python3.
flowjax_python() {
  if [[ -n ${PYTHON:-} ]]; then echo "$PYTHON"
  elif [[ -x $1/.venv/bin/python ]]; then echo "$1/.venv/bin/python"
  else echo python3
  fi
}
