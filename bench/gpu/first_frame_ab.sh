#!/usr/bin/env bash
# Issue 18 on the GPU machine, part of one call (about 3.5 minutes): first frames of a tiered start, an earlier
# commit ($BASE) against this tree, in the same call: the demo and the Self-Forcing graph (random weights), each on
# empty caches ("fresh") and again on the caches that left ("restart": a tiered restart's first frame does not
# wait for the compiled tier). Sides alternate graph by graph. Both sides are driven by this tree's
# bench/bench_startup.py; the base runs its own package, installed (not editable) from `git archive $BASE`.
# Expects bench/device_setup.sh to have run (PYTHONPATH=/tmp/site). Writes $OUT/ab/{demo,sf}_{base,head}.json/.log.
: "${BASE:?set BASE to the commit to compare with}"
D="$OUT/ab"; mkdir -p "$D"; REPO=$(pwd)
rm -rf /tmp/ab-base /tmp/ab-base-site; mkdir -p /tmp/ab-base
git archive "$BASE" | tar -x -C /tmp/ab-base
(cd /tmp/ab-base && python3 -m pip install -q --no-deps --no-build-isolation --no-index --target /tmp/ab-base-site . \
  > "$D/base_install.log" 2>&1) || { echo "could not install $BASE"; tail -5 "$D/base_install.log"; }
side() {  # base|head, graph tag, bench args...
  local s=$1 tag=$2; shift 2
  local dir=$REPO pp=/tmp/site
  [ "$s" = base ] && dir=/tmp/ab-base pp=/tmp/ab-base-site:/tmp/site
  (cd "$dir" && PYTHONPATH=$pp python3 "$REPO/bench/bench_startup.py" --first-frames --restart-from tiered_fresh \
    --scenarios tiered_fresh,tiered_restart --root "/tmp/ab-$s-$tag" --json "$D/${tag}_$s.json" "$@" \
    > "$D/${tag}_$s.log" 2>&1)
  echo "== $tag $s ($(cd / && PYTHONPATH=$pp python3 -c 'import reactor_graph, os; print(os.path.dirname(reactor_graph.__file__))'))"
  grep -E "first frame" "$D/${tag}_$s.log"
}
for s in base head; do side $s demo --graph graphs/demo.yaml --blocks 20 --child-seconds 50; done
for s in base head; do side $s sf --graph graphs/self_forcing.yaml --random-weights --blocks 3 --child-seconds 70; done
