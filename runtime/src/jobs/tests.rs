use super::*;

fn config() -> JobsConfig {
    JobsConfig {
        max_lines: 10,
        max_active_per_tenant: 2,
        max_stored_per_tenant: 5,
        ..JobsConfig::default()
    }
}

fn line(id: &str) -> String {
    format!(
        r#"{{"custom_id": "{id}", "method": "POST", "url": "/v1/completions", "body": {{"model": "m", "prompt": "hi"}}}}"#
    )
}

fn file(ids: &[&str]) -> Vec<u8> {
    ids.iter()
        .map(|id| line(id) + "\n")
        .collect::<String>()
        .into_bytes()
}

fn answer(job: &Job, line: u32, failed: bool) {
    let output = format!(r#"{{"line": {line}}}"#).into_bytes();
    assert!(job.answer(line, failed, output).unwrap());
}

#[test]
fn a_submitted_job_is_on_disk_and_comes_back_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let jobs = Jobs::open(dir.path(), config()).unwrap();
    let job = jobs
        .submit("alpha", "uid 1000", None, &file(&["a", "b", "c"]))
        .unwrap();
    assert!(is_job_id(&job.meta.id), "{}", job.meta.id);
    assert_eq!(job.meta.lines, 3);
    assert_eq!(
        job.read_line(1, 1 << 20).unwrap(),
        Ok(line("b").into_bytes())
    );
    // A line over the limit is not read at all.
    assert_eq!(job.read_line(1, 10).unwrap(), Err(line("b").len() as u64));
    job.mark_started().unwrap();
    answer(&job, 2, false);
    answer(&job, 0, true);
    // Answering a line twice adds nothing, and nothing is journaled.
    assert!(!job.answer(2, false, b"{}".to_vec()).unwrap());
    let id = job.meta.id.clone();
    drop((job, jobs));

    let jobs = Jobs::open(dir.path(), config()).unwrap();
    let job = jobs.get(&id).expect("the job is loaded again");
    assert_eq!(job.pending(), [1]);
    let view = job.view();
    assert_eq!(view.status, Status::InProgress);
    assert!(view.in_progress_at.is_some());
    assert_eq!(
        view.request_counts,
        RequestCounts {
            total: 3,
            completed: 1,
            failed: 1
        }
    );
    let output = std::fs::read_to_string(job.dir.join("output.jsonl")).unwrap();
    assert_eq!(output, "{\"line\": 2}\n");
    let errors = std::fs::read_to_string(job.dir.join("errors.jsonl")).unwrap();
    assert_eq!(errors, "{\"line\": 0}\n");
    answer(&job, 1, false);
    assert!(job.finish(Status::Completed, None).unwrap());
    assert!(
        !job.finish(Status::Failed, None).unwrap(),
        "a job ends once"
    );
    assert!(job.view().completed_at.is_some());
}

#[test]
fn output_files_that_disagree_with_the_journal_are_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    let jobs = Jobs::open(dir.path(), config()).unwrap();
    let job = jobs
        .submit("alpha", "uid 0", None, &file(&["a", "b", "c"]))
        .unwrap();
    for i in 0..3 {
        answer(&job, i, i == 1);
    }
    let id = job.meta.id.clone();
    let output = job.dir.join("output.jsonl");
    let whole = std::fs::read(&output).unwrap();
    drop((job, jobs));
    // A crash after the journal write but during the output write: a cut line.
    std::fs::write(&output, &whole[..whole.len() - 4]).unwrap();
    let jobs = Jobs::open(dir.path(), config()).unwrap();
    let job = jobs.get(&id).unwrap();
    assert_eq!(std::fs::read(&output).unwrap(), whole);
    let (_, len) = job.output_file(false).unwrap();
    assert_eq!(len, whole.len() as u64);
    // And an output line with no journal record behind it (impossible by the write order,
    // but a file edited by hand) is dropped.
    std::fs::write(&output, [&whole[..], b"{\"stray\": 1}\n"].concat()).unwrap();
    drop((job, jobs));
    Jobs::open(dir.path(), config()).unwrap();
    assert_eq!(std::fs::read(&output).unwrap(), whole);
}

#[test]
fn a_torn_journal_tail_loses_only_its_last_answer() {
    let dir = tempfile::tempdir().unwrap();
    let jobs = Jobs::open(dir.path(), config()).unwrap();
    let job = jobs
        .submit("alpha", "uid 0", None, &file(&["a", "b"]))
        .unwrap();
    answer(&job, 0, false);
    answer(&job, 1, false);
    let id = job.meta.id.clone();
    let journal = job.dir.join("journal");
    drop((job, jobs));
    let len = std::fs::metadata(&journal).unwrap().len();
    let f = OpenOptions::new().write(true).open(&journal).unwrap();
    f.set_len(len - 3).unwrap();
    drop(f);
    let jobs = Jobs::open(dir.path(), config()).unwrap();
    let job = jobs.get(&id).unwrap();
    assert_eq!(job.pending(), [1], "the torn answer is answered again");
    assert_eq!(job.view().request_counts.completed, 1);
    assert_eq!(
        std::fs::read_to_string(job.dir.join("output.jsonl")).unwrap(),
        "{\"line\": 0}\n"
    );
}

#[test]
fn submissions_are_checked_before_anything_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    let jobs = Jobs::open(dir.path(), config()).unwrap();
    assert!(matches!(
        jobs.submit("alpha", "uid 0", None, b"\n  \n"),
        Err(SubmitError::Empty)
    ));
    let many: Vec<String> = (0..11).map(|i| format!("id{i}")).collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    assert!(matches!(
        jobs.submit("alpha", "uid 0", None, &file(&many)),
        Err(SubmitError::TooManyLines { limit: 10 })
    ));
    match jobs.submit("alpha", "uid 0", None, &file(&["x", "y", "x"])) {
        Err(SubmitError::DuplicateId { id, first, second }) => {
            assert_eq!((id.as_str(), first, second), ("x", 1, 3))
        }
        other => panic!("{other:?}"),
    }
    // Blank lines and a malformed line are fine here: the malformed one fails alone later.
    let job = jobs
        .submit(
            "alpha",
            "uid 0",
            None,
            b"\nnot json\n\n{\"custom_id\": \"z\"}",
        )
        .unwrap();
    assert_eq!(job.meta.lines, 2);
    assert_eq!(job.read_line(0, 100).unwrap(), Ok(b"not json".to_vec()));
    // Two unfinished jobs is alpha's limit here; the policy's max_jobs overrides it.
    jobs.submit("alpha", "uid 0", None, &file(&["a"])).unwrap();
    assert!(matches!(
        jobs.submit("alpha", "uid 0", None, &file(&["a"])),
        Err(SubmitError::TooMany { active: 2, .. })
    ));
    jobs.submit("alpha", "uid 0", Some(3), &file(&["a"]))
        .unwrap();
    jobs.submit("beta", "uid 0", None, &file(&["a"])).unwrap();
    // Only whole jobs are in the directory: no leftovers of the refused ones.
    let entries = std::fs::read_dir(dir.path()).unwrap().count();
    assert_eq!(entries, 4);
}

#[test]
fn half_written_submissions_and_expired_jobs_are_removed_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let jobs = Jobs::open(dir.path(), config()).unwrap();
    let done = jobs.submit("alpha", "uid 0", None, &file(&["a"])).unwrap();
    answer(&done, 0, false);
    done.finish(Status::Completed, None).unwrap();
    let open = jobs.submit("alpha", "uid 0", None, &file(&["a"])).unwrap();
    let (done_id, open_id) = (done.meta.id.clone(), open.meta.id.clone());
    drop((done, open, jobs));
    std::fs::create_dir(dir.path().join(".tmp-job_000000000000000000000000")).unwrap();
    // A foreign directory is none of ours and stays.
    std::fs::create_dir(dir.path().join("lost+found")).unwrap();
    let expiring = JobsConfig {
        retention: Duration::ZERO,
        ..config()
    };
    // Finished "now" is not older than a zero retention until the clock moves on.
    std::thread::sleep(Duration::from_millis(1100));
    let jobs = Jobs::open(dir.path(), expiring).unwrap();
    assert!(jobs.get(&done_id).is_none());
    assert!(!dir.path().join(&done_id).exists());
    assert!(jobs.get(&open_id).is_some(), "unfinished jobs never expire");
    assert!(!dir
        .path()
        .join(".tmp-job_000000000000000000000000")
        .exists());
    assert!(dir.path().join("lost+found").exists());
}

#[test]
fn cancelling_is_journaled_and_a_restart_finishes_it() {
    let dir = tempfile::tempdir().unwrap();
    let jobs = Jobs::open(dir.path(), config()).unwrap();
    let job = jobs
        .submit("alpha", "uid 0", None, &file(&["a", "b"]))
        .unwrap();
    let watch = job.cancelled();
    assert!(job.request_cancel().unwrap());
    assert!(*watch.borrow());
    assert_eq!(job.status(), Status::Cancelling);
    let id = job.meta.id.clone();
    drop((job, jobs));
    let jobs = Jobs::open(dir.path(), config()).unwrap();
    let job = jobs.get(&id).unwrap();
    assert_eq!(job.status(), Status::Cancelling);
    assert!(job.view().cancelling_at.is_some());
    job.finish(Status::Cancelled, None).unwrap();
    assert!(
        !job.request_cancel().unwrap(),
        "a finished job is not cancelled again"
    );
}

#[test]
fn job_ids_name_no_path() {
    assert!(!is_job_id("../../etc"));
    assert!(!is_job_id("job_../../../../../../../etc"));
    assert!(!is_job_id("job_ABCDEF000000000000000000"));
    assert!(is_job_id("job_0123456789abcdef01234567"));
    assert!(is_job_id(&new_id()));
    assert_ne!(new_id(), new_id());
}

#[test]
fn line_indexing_stops_at_the_limit_and_skips_blank_lines() {
    assert_eq!(
        index_lines(b"a\n\n  \nbc\r\n d", 10),
        Ok(vec![(0, 1), (6, 3), (10, 2)])
    );
    assert_eq!(index_lines(b"", 10), Ok(vec![]));
    // A million one-byte lines against a limit of 10: refused, having kept 10.
    let many = b"x\n".repeat(1_000_000);
    let mut index = LineIndex::new(10);
    index.feed(&many);
    assert_eq!(index.lines.len(), 10);
    assert!(index.finish().is_err());
    // Fed in pieces, the same ranges as whole.
    let text = b"{\"a\": 1}\n\n{\"b\": 2}\n{\"c\"";
    let mut pieces = LineIndex::new(10);
    for chunk in text.chunks(3) {
        pieces.feed(chunk);
    }
    assert_eq!(pieces.finish(), index_lines(text, 10));
}

#[test]
fn finished_jobs_count_against_the_stored_limit() {
    let dir = tempfile::tempdir().unwrap();
    let jobs = Jobs::open(dir.path(), config()).unwrap();
    for _ in 0..5 {
        let job = jobs.submit("alpha", "uid 0", None, &file(&["a"])).unwrap();
        answer(&job, 0, false);
        job.finish(Status::Completed, None).unwrap();
    }
    assert!(matches!(
        jobs.submit("alpha", "uid 0", None, &file(&["a"])),
        Err(SubmitError::TooManyStored { stored: 5, .. })
    ));
}

#[test]
fn an_output_write_that_fails_leaves_the_served_length_at_whole_lines() {
    let dir = tempfile::tempdir().unwrap();
    let jobs = Jobs::open(dir.path(), config()).unwrap();
    let job = jobs
        .submit("alpha", "uid 0", None, &file(&["a", "b"]))
        .unwrap();
    answer(&job, 0, false);
    let (_, before) = job.output_file(false).unwrap();
    // The output file's handle now refuses writes (as on a full disk): the answer is still
    // journaled, the served length stays at whole lines.
    {
        let mut writer = lock(&job.writer);
        writer.output = File::open(job.dir.join("output.jsonl")).unwrap();
    }
    answer(&job, 1, false);
    assert_eq!(job.view().request_counts.completed, 2);
    assert_eq!(job.output_file(false).unwrap().1, before);
    // A restart rebuilds the file from the journal, with both answers.
    let id = job.meta.id.clone();
    drop((job, jobs));
    let jobs = Jobs::open(dir.path(), config()).unwrap();
    let job = jobs.get(&id).unwrap();
    let (_, after) = job.output_file(false).unwrap();
    assert!(after > before);
    let text = std::fs::read_to_string(job.dir.join("output.jsonl")).unwrap();
    assert_eq!(text.lines().count(), 2);
}

#[test]
fn status_names_are_the_apis() {
    for status in [
        Status::InProgress,
        Status::Cancelling,
        Status::Completed,
        Status::Cancelled,
        Status::Failed,
    ] {
        assert_eq!(serde_json::to_value(status).unwrap(), status.as_str());
    }
}

#[test]
fn only_unfinished_jobs_read_their_input_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let jobs = Jobs::open(dir.path(), config()).unwrap();
    let done = jobs.submit("alpha", "uid 0", None, &file(&["a"])).unwrap();
    answer(&done, 0, false);
    done.finish(Status::Completed, None).unwrap();
    let open = jobs.submit("alpha", "uid 0", None, &file(&["a"])).unwrap();
    let (done_id, open_id) = (done.meta.id.clone(), open.meta.id.clone());
    drop((done, open, jobs));
    // Both inputs lose their line: only the job that still needs it notices.
    for id in [&done_id, &open_id] {
        std::fs::write(dir.path().join(id).join("input.jsonl"), b"").unwrap();
    }
    let jobs = Jobs::open(dir.path(), config()).unwrap();
    assert_eq!(jobs.get(&done_id).unwrap().status(), Status::Completed);
    assert!(
        jobs.get(&open_id).is_none(),
        "an unfinished job with a broken input is not served"
    );
}
