//! One function per subcommand. Each loads what it needs, prints, and returns an exit code.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use super::output::{out, outln};
use super::{
    Command, DagFormat, PipelineArgs, RemoteArgs, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_INVALID, EXIT_OK,
};
use crate::engine::config::raw::ExecutorKind;
use crate::engine::executor::{self, Outcome, RunOptions};
use crate::engine::slurm::{self, SlurmOutcome, SlurmRunOptions};
use crate::engine::status::{self, State, Stored};
use crate::engine::{gc, load_checked, watch, Engine, OpenError};
use crate::stages::registry;
use crate::torch_env;

pub fn dispatch(command: Command) -> i32 {
    match command {
        Command::Run {
            pipeline,
            stages,
            force,
            dry_run,
            keep_going,
            jobs,
            gpus,
            json,
            executor,
            detach,
            remote,
        } => {
            if dry_run {
                let shown = Shown {
                    json,
                    dry_run: true,
                    exit_code: false,
                };
                return print_status(&pipeline, &stages, shown, &remote);
            }
            let gpus_given = gpus.is_some();
            let options = RunOptions {
                targets: stages,
                force,
                keep_going,
                jobs: jobs.unwrap_or_else(cores),
                threads: cores(),
                gpus: gpus.unwrap_or_default(),
                quiet: json,
            };
            run(&pipeline, &remote, options, gpus_given, json, executor, detach)
        }
        Command::Predict(args) => super::predict_command::predict(args),
        Command::ExportModel(args) => super::export_command::export_model(args),
        Command::Cancel { pipeline } => cancel_slurm_run(&pipeline),
        Command::SlurmJob {
            pipeline,
            run_dir,
            ids,
        } => match open(&pipeline) {
            Ok(engine) => crate::engine::slurm::job::run_job(&engine, &run_dir, &ids, &cancellation()),
            Err(code) => code,
        },
        Command::Status {
            pipeline,
            stages,
            json,
            exit_code,
            remote,
        } => {
            let shown = Shown {
                json,
                dry_run: false,
                exit_code,
            };
            print_status(&pipeline, &stages, shown, &remote)
        }
        Command::Dag { pipeline, format } => dag(&pipeline, format),
        Command::Report { pipeline, out, open } => super::report_command::report(&pipeline, out, open),
        Command::Validate { pipeline } => validate(&pipeline),
        Command::Schema => {
            out!("{}", crate::schema::pipeline_schema_text());
            EXIT_OK
        }
        Command::Watch {
            pipeline,
            jobs,
            debounce_ms,
            remote,
        } => watch_pipeline(&pipeline, &remote, jobs, debounce_ms),
        Command::Gc { pipeline, keep_last } => collect_garbage(&pipeline, keep_last),
        Command::Doctor { json } => doctor(json),
        Command::Import {
            images,
            labels,
            channels,
            label_values,
            config,
            msd,
            dataset_id,
            out,
        } => match (msd, labels) {
            (Some(task), _) => super::data_commands::import_msd(task, dataset_id, out),
            (None, Some(labels)) => {
                super::data_commands::import(images, labels, channels, label_values, config, out)
            }
            (None, None) => unreachable!("clap requires --labels without --msd"),
        },
        Command::Check { dataset } => super::data_commands::check(&dataset),
        Command::Synth {
            dataset,
            cases,
            shape,
            spacing,
            channels,
            foreground_labels,
            seed,
            spacing_variation,
            test_cases,
            format,
        } => {
            let args = super::data_commands::SynthArgs {
                cases,
                shape,
                spacing,
                channels,
                foreground_labels,
                seed,
                spacing_variation,
                test_cases,
                file_ending: format,
            };
            super::data_commands::synth(&dataset, args)
        }
    }
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

pub(super) fn open(args: &PipelineArgs) -> Result<Engine, i32> {
    open_with(args, &RemoteArgs::default())
}

/// [`open`] with the remote cache the command line chose.
fn open_with(args: &PipelineArgs, remote: &RemoteArgs) -> Result<Engine, i32> {
    Engine::open_with(&args.pipeline, &args.sets, registry(), &remote.choice()).map_err(|error| {
        match error {
            OpenError::Invalid(diagnostics) => crate::errln!("{diagnostics}"),
            other => crate::errln!("error: {other}"),
        }
        EXIT_INVALID
    })
}

/// SIGINT / SIGTERM set the flag: running stages are stopped and nothing half-done is committed.
/// A second Ctrl-C exits at once.
fn cancellation() -> Arc<AtomicBool> {
    let flag = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        let _ = signal_hook::flag::register_conditional_shutdown(signal, EXIT_INTERRUPTED, Arc::clone(&flag));
        let _ = signal_hook::flag::register(signal, Arc::clone(&flag));
    }
    flag
}

/// Runs a whole pipeline locally with the default options (the commands that write a pipeline and
/// run it).
pub(super) fn run_pipeline(args: &PipelineArgs, json: bool) -> i32 {
    let options = RunOptions {
        targets: Vec::new(),
        force: Vec::new(),
        keep_going: false,
        jobs: cores(),
        threads: cores(),
        gpus: Vec::new(),
        quiet: json,
    };
    let remote = RemoteArgs::default();
    run(
        args,
        &remote,
        options,
        false,
        json,
        Some(ExecutorKind::Local),
        false,
    )
}

fn run(
    args: &PipelineArgs,
    remote: &RemoteArgs,
    mut options: RunOptions,
    gpus_given: bool,
    json: bool,
    executor: Option<ExecutorKind>,
    detach: bool,
) -> i32 {
    let engine = match open_with(args, remote) {
        Ok(engine) => engine,
        Err(code) => return code,
    };
    let executor = executor.unwrap_or(engine.pipeline.executor);
    if detach && executor != ExecutorKind::Slurm {
        crate::errln!("error: --detach needs the Slurm executor (--executor slurm)");
        return EXIT_INVALID;
    }
    if executor == ExecutorKind::Slurm {
        let slurm_options = SlurmRunOptions {
            detach,
            sets: args.sets.clone(),
            env: remote.env(),
        };
        let cancel = cancellation();
        return match slurm::run(&engine, &options, &slurm_options, &cancel) {
            Ok(SlurmOutcome::Finished(report)) => print_report(report, json),
            Ok(SlurmOutcome::Detached(run)) => {
                if json {
                    outln!("{}", serde_json::to_string_pretty(&run).expect("run serializes"));
                } else {
                    for job in &run.jobs {
                        outln!(
                            "{}  {} ({} instance(s))",
                            job.job_id,
                            job.stage,
                            job.instances.len()
                        );
                    }
                    crate::errln!("detached; `nnflow status` follows the run, `nnflow cancel` cancels it");
                }
                EXIT_OK
            }
            Err(error) => {
                crate::errln!("error: {error}");
                EXIT_FAILED
            }
        };
    }
    if !gpus_given {
        options.gpus = detect_gpus(&engine);
    }
    let cancel = cancellation();
    run_engine(&engine, &options, json, &cancel)
}

/// GPU indices, asked of the torch worker only when a stage needs GPUs (starting libtorch is slow).
fn detect_gpus(engine: &Engine) -> Vec<usize> {
    if engine
        .pipeline
        .instances
        .iter()
        .all(|instance| instance.gpus == 0)
    {
        return Vec::new();
    }
    match torch_env::query_worker() {
        Ok(facts) => (0..facts.gpu_count).collect(),
        Err(error) => {
            crate::errln!("warning: cannot detect GPUs ({error}); use --gpus");
            Vec::new()
        }
    }
}

fn run_engine(engine: &Engine, options: &RunOptions, json: bool, cancel: &AtomicBool) -> i32 {
    match executor::run(engine, options, cancel) {
        Ok(report) => print_report(report, json),
        Err(error) => {
            crate::errln!("error: {error}");
            EXIT_INVALID
        }
    }
}

/// Prints a run's report (JSON, or a summary line) and returns the exit code.
fn print_report(report: executor::RunReport, json: bool) -> i32 {
    if json {
        outln!(
            "{}",
            serde_json::to_string_pretty(&report).expect("report serializes")
        );
    } else {
        let count = |outcome| report.stages.iter().filter(|s| s.outcome == outcome).count();
        crate::errln!(
            "{}: {} ran, {} cached, {} failed, {} skipped",
            report.pipeline,
            count(Outcome::Ran),
            count(Outcome::Cached),
            count(Outcome::Failed),
            count(Outcome::Skipped) + count(Outcome::NotApplicable)
        );
        if let Some(remote) = &report.remote {
            let (down, up) = (&remote.downloaded, &remote.uploaded);
            crate::errln!(
                "remote cache {}: {} result(s) restored ({} bytes), {} uploaded ({} bytes)",
                remote.url,
                down.entries,
                down.bytes,
                up.entries,
                up.bytes
            );
        }
    }
    if report.interrupted {
        EXIT_INTERRUPTED
    } else if report.ok {
        EXIT_OK
    } else {
        EXIT_FAILED
    }
}

/// How `status` (and `run --dry-run`) prints.
#[derive(Clone, Copy)]
struct Shown {
    json: bool,
    dry_run: bool,
    /// Exit 1 when an instance is stale or new.
    exit_code: bool,
}

fn print_status(args: &PipelineArgs, stages: &[String], shown: Shown, remote: &RemoteArgs) -> i32 {
    let Shown {
        json,
        dry_run,
        exit_code,
    } = shown;
    let engine = match open_with(args, remote) {
        Ok(engine) => engine,
        Err(code) => return code,
    };
    let report = match status::status(&engine, stages) {
        Ok(report) => report,
        Err(error) => {
            crate::errln!("error: {error}");
            return EXIT_INVALID;
        }
    };
    let stale = report
        .iter()
        .filter(|stage| matches!(stage.state, State::Stale | State::New))
        .count();
    let code = if exit_code && stale > 0 {
        EXIT_FAILED
    } else {
        EXIT_OK
    };
    // the latest Slurm run, reconciled with the queue and the jobs' receipts
    let slurm_run = if dry_run { None } else { slurm::reconcile(&engine) };
    if json {
        let remote = engine
            .remote
            .as_ref()
            .map(|remote| serde_json::json!({ "url": remote.shown(), "mode": remote.mode() }));
        let mut value = serde_json::json!({
            "schema_version": executor::JSON_SCHEMA_VERSION,
            "pipeline": engine.pipeline.name,
            "dry_run": dry_run,
            "stale": stale,
            "remote": remote,
            "stages": report,
        });
        if let Some((run, rows)) = &slurm_run {
            let instances: Vec<serde_json::Value> = rows
                .iter()
                .map(|(id, state, job)| serde_json::json!({ "id": id, "state": state, "job": job }))
                .collect();
            value["slurm"] = serde_json::json!({
                "run_id": run.run_id, "job_name": run.job_name, "instances": instances,
            });
        }
        outln!(
            "{}",
            serde_json::to_string_pretty(&value).expect("status serializes")
        );
        return code;
    }
    for stage in &report {
        let label = match (stage.state, dry_run) {
            (State::Fresh, _) => "fresh",
            (State::Skipped, _) => "skip",
            (_, true) if stage.in_cache => "restore",
            (_, true) => "run",
            (State::Stale, false) => "stale",
            (State::New, false) => "new",
        };
        let cached = match (stage.state, stage.cache) {
            (State::Skipped, _) | (_, Stored::Unknown) => "",
            (_, Stored::Local) => "  (in the local cache)",
            (_, Stored::Remote) => "  (in the remote cache)",
            (_, Stored::Neither) => "  (in no cache)",
        };
        outln!("{label:>8}  {}{cached}", stage.id);
        for reason in &stage.reasons {
            outln!("            {reason}");
        }
    }
    if let Some((run, rows)) = slurm_run {
        outln!("Slurm run {} ({}):", run.run_id, run.job_name);
        for (id, state, job) in rows {
            outln!("  {state:>8}  {id}  [{job}]");
        }
    }
    code
}

/// Cancels the latest Slurm run's jobs.
fn cancel_slurm_run(args: &PipelineArgs) -> i32 {
    let engine = match open(args) {
        Ok(engine) => engine,
        Err(code) => return code,
    };
    match slurm::cancel(&engine) {
        Ok(run) => {
            let ids: Vec<&str> = run.jobs.iter().map(|j| j.job_id.as_str()).collect();
            crate::errln!("cancelled {} ({})", run.job_name, ids.join(", "));
            EXIT_OK
        }
        Err(error) => {
            crate::errln!("error: {error}");
            EXIT_FAILED
        }
    }
}

fn validate(args: &PipelineArgs) -> i32 {
    match load_checked(&args.pipeline, &args.sets, registry()) {
        Ok(pipeline) => {
            outln!(
                "{}: {} stage instance(s), valid",
                args.pipeline.display(),
                pipeline.instances.len()
            );
            EXIT_OK
        }
        Err(diagnostics) => {
            crate::errln!("{diagnostics}");
            EXIT_INVALID
        }
    }
}

fn dag(args: &PipelineArgs, format: DagFormat) -> i32 {
    let engine = match open(args) {
        Ok(engine) => engine,
        Err(code) => return code,
    };
    let instances = &engine.pipeline.instances;
    let quote = |s: &str| s.replace('"', "\\\"");
    let mut out = String::new();
    match format {
        DagFormat::Text => {
            for &i in &engine.dag.order {
                let deps: Vec<&str> = engine
                    .dag
                    .dependencies(i)
                    .iter()
                    .map(|&d| instances[d].id.as_str())
                    .collect();
                let after = if deps.is_empty() {
                    String::new()
                } else {
                    format!("  <- {}", deps.join(", "))
                };
                out.push_str(&format!(
                    "{} ({}){after}\n",
                    instances[i].id, instances[i].kind.name
                ));
            }
        }
        DagFormat::Dot => {
            out.push_str(&format!(
                "digraph \"{}\" {{\n  rankdir=LR;\n",
                quote(&engine.pipeline.name)
            ));
            for &i in &engine.dag.order {
                out.push_str(&format!(
                    "  n{i} [label=\"{}\\n({})\"];\n",
                    quote(&instances[i].id),
                    instances[i].kind.name
                ));
            }
            for &i in &engine.dag.order {
                for d in engine.dag.dependencies(i) {
                    out.push_str(&format!("  n{d} -> n{i};\n"));
                }
            }
            out.push_str("}\n");
        }
        DagFormat::Mermaid => {
            out.push_str("flowchart LR\n");
            for &i in &engine.dag.order {
                out.push_str(&format!(
                    "  n{i}[\"{} ({})\"]\n",
                    instances[i].id.replace('"', "#quot;"),
                    instances[i].kind.name
                ));
            }
            for &i in &engine.dag.order {
                for d in engine.dag.dependencies(i) {
                    out.push_str(&format!("  n{d} --> n{i}\n"));
                }
            }
        }
    }
    out!("{out}");
    EXIT_OK
}

fn watch_pipeline(args: &PipelineArgs, remote: &RemoteArgs, jobs: Option<usize>, debounce_ms: u64) -> i32 {
    let cancel = cancellation();
    let options = RunOptions {
        jobs: jobs.unwrap_or_else(cores),
        threads: cores(),
        ..RunOptions::default()
    };
    let result = watch::watch(
        &args.pipeline,
        Duration::from_millis(debounce_ms),
        &cancel,
        || {
            let engine = open_with(args, remote).ok()?;
            run_engine(&engine, &options, false, &AtomicBool::new(false));
            crate::errln!(
                "watching {} for changes (Ctrl-C to stop)",
                args.pipeline.display()
            );
            Some(engine)
        },
    );
    match result {
        Ok(()) => EXIT_OK,
        Err(error) => {
            crate::errln!("error: {error}");
            EXIT_FAILED
        }
    }
}

fn collect_garbage(args: &PipelineArgs, keep_last: usize) -> i32 {
    let engine = match open(args) {
        Ok(engine) => engine,
        Err(code) => return code,
    };
    match gc::collect(&engine, keep_last) {
        Ok(report) => {
            outln!(
                "removed {} cache entries and {} blobs, freed {} bytes; removed {} staging folders of killed runs",
                report.entries_removed,
                report.blobs_removed,
                report.bytes_freed,
                report.staging_folders_removed
            );
            EXIT_OK
        }
        Err(error) => {
            crate::errln!("error: {error}");
            EXIT_FAILED
        }
    }
}

fn doctor(json: bool) -> i32 {
    let cores = cores();
    let rayon_threads = rayon::current_num_threads();
    let torch = torch_env::query_worker();
    if json {
        let value = serde_json::json!({
            "nnflow_version": env!("CARGO_PKG_VERSION"),
            "cpu_cores": cores,
            "rayon_threads": rayon_threads,
            "torch": torch.as_ref().ok(),
            "torch_error": torch.as_ref().err().map(ToString::to_string),
        });
        outln!(
            "{}",
            serde_json::to_string_pretty(&value).expect("doctor serializes")
        );
        return if torch.is_ok() { EXIT_OK } else { EXIT_FAILED };
    }
    outln!("nnflow            {}", env!("CARGO_PKG_VERSION"));
    outln!("CPU cores         {cores}");
    outln!("rayon threads     {rayon_threads}");
    match torch {
        Ok(facts) => {
            outln!("libtorch          {}", facts.libtorch_version);
            let cuda_library = if facts.libtorch_cuda_loaded {
                "loaded"
            } else {
                "not found (CPU only)"
            };
            outln!("libtorch_cuda.so  {cuda_library}");
            outln!("CUDA available    {}", facts.cuda_available);
            outln!("cuDNN available   {}", facts.cudnn_available);
            outln!("GPUs              {}", facts.gpu_count);
            outln!(
                "torch threads     {} (inter-op {})",
                facts.torch_threads,
                facts.torch_interop_threads
            );
            EXIT_OK
        }
        Err(error) => {
            outln!("libtorch          unavailable: {error}");
            EXIT_FAILED
        }
    }
}
