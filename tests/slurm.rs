//! On a real Slurm cluster (`tools/start-slurm`, which `.ci/run` calls): a 4-task job array scanning a zoo of small
//! checkpoints with `--shard auto` gathers to exactly the single-process result. Skipped, saying so, where `sinfo`
//! is absent or no node is up.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use graft::checkpoint::{CheckpointWriter, Dtype, TensorDecl, WriterOptions};

fn slurm_up() -> bool {
    let Ok(out) = Command::new("sinfo").args(["-h", "-o", "%T"]).output() else {
        eprintln!("SKIPPED: no `sinfo` on this machine (tools/start-slurm installs and starts a one-node cluster)");
        return false;
    };
    let states = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || !states.lines().any(|s| matches!(s.trim(), "idle" | "mixed" | "allocated")) {
        eprintln!("SKIPPED: Slurm is installed but no node is up (run tools/start-slurm as root)");
        return false;
    }
    true
}

fn write_zoo(zoo: &Path, n: usize) {
    std::fs::create_dir_all(zoo).unwrap();
    for m in 0..n {
        let decls = vec![TensorDecl::new("model.layers.0.mlp.up_proj.weight", Dtype::F32, vec![8, 6])];
        let path = zoo.join(format!("m{m:02}.safetensors"));
        let mut w = CheckpointWriter::create(&path, decls, WriterOptions::default()).unwrap();
        // A distinct, known spectrum per model: a diagonal plus a small model-dependent ripple.
        let mut v = vec![0f32; 48];
        for i in 0..6 {
            v[i * 6 + i] = (6 - i) as f32 + m as f32 * 0.25;
        }
        for (j, x) in v.iter_mut().enumerate() {
            *x += ((j * (m + 3)) % 7) as f32 * 0.01;
        }
        w.write_f32("model.layers.0.mlp.up_proj.weight", &v).unwrap();
        w.finish().unwrap();
    }
}

#[test]
fn job_array_gathers_to_the_single_process_result() {
    if !slurm_up() {
        return;
    }
    // slurmd runs the job on this machine as root, so the job's files live where the test can read them.
    let dir = tempfile::tempdir().unwrap();
    let zoo = dir.path().join("zoo");
    write_zoo(&zoo, 12);
    let graft = env!("CARGO_BIN_EXE_graft");
    let pattern = format!("{}/*", zoo.display());
    let single = dir.path().join("single.jsonl");
    let out = Command::new(graft).args(["snr", &pattern, "--resume"]).arg(&single).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let script = dir.path().join("array.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/bash\n#SBATCH --array=1-4\n#SBATCH --cpus-per-task=1\n#SBATCH --mem=200M\n\
             exec '{graft}' --threads 1 snr '{pattern}' --shard auto --resume \"{dir}/shard-$SLURM_ARRAY_TASK_ID.jsonl\"\n",
            dir = dir.path().display()
        ),
    )
    .unwrap();
    let out = Command::new("sbatch")
        .args(["--parsable", "--wait", "--job-name=graft-shard-test"])
        .arg(format!("--output={}/slurm-%A_%a.out", dir.path().display()))
        .arg(&script)
        .current_dir(dir.path())
        .output()
        .unwrap();
    let logs: String = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("slurm-"))
        .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
        .collect();
    assert!(out.status.success(), "sbatch: {}\n{logs}", String::from_utf8_lossy(&out.stderr));

    // The job wrote four shard files (array tasks 1..4 are shards 0..3), each with its manifest.
    let shards: Vec<String> = (1..=4).map(|t| format!("{}/shard-{t}.jsonl", dir.path().display())).collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !shards.iter().all(|s| Path::new(s).exists()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    let sizes: Vec<usize> = shards.iter().map(|s| std::fs::read_to_string(s).unwrap().lines().count()).collect();
    assert_eq!(sizes, [3, 3, 3, 3], "{logs}");
    let gathered = dir.path().join("gathered.jsonl");
    let out = Command::new(graft).arg("gather").arg(&gathered).args(&shards).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::read_to_string(&gathered).unwrap(), std::fs::read_to_string(&single).unwrap());
}
