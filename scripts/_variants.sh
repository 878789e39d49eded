for v in "none" "cuda" "cuda-blocking" "cuda-process" "gil" "gil --switch-interval 0.0005" "cuda --switch-interval 0.0005" "cpu-torch --torch-threads 16" "cpu-torch --torch-threads 1"; do
  echo "== $v"; timeout 60 python3 scripts/libero_alone.py --steps 120 --load $v 2>&1 | grep '^{'
done
