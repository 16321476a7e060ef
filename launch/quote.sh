# shellcheck shell=bash
# Sourced by tpu_pod.sh and gpu_slurm.sh: print commands so that a shell runs them as printed.
quote() { # shell-quote one word, leaving plain words and the --flag= of --flag=value readable
  local s=$1 q="'"
  if [[ $s =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$s"
  elif [[ $s =~ ^(--[A-Za-z0-9_.-]+=)(.+)$ ]]; then
    printf '%s' "${BASH_REMATCH[1]}"
    quote "${BASH_REMATCH[2]}"
  else
    printf "'%s'" "${s//$q/$q\\$q$q}"
  fi
}
quote_all() {
  local a line=''
  for a in "$@"; do line+="${line:+ }$(quote "$a")"; done
  printf '%s' "$line"
}
