//! Which UNet runs a batch of latent-diffusion jobs takes. A pure plan, so how lanes are cut
//! into runs, how guidance lays out the rows, and how a stopped job leaves the batch are tested
//! without a model.
//!
//! Every frame of every job is a [`Lane`]. Lanes are cut into chunks of at most as many lanes
//! as `max_unet_rows` allows; a chunk runs all its steps and is decoded before the next starts,
//! which bounds GPU memory whatever the batch or video. Each step of a chunk is one UNet run
//! over the lanes of the jobs still rendering: a job that stops (canceled, handed back, lost)
//! leaves the runs from the next step on, and the others go on without it.

/// [`plan`]'s `max_unet_rows` counts rows of this many latent pixels (512×512 images).
pub const ROW_LATENT_PIXELS: usize = 64 * 64;

/// One image of a batch: frame `frame` of the batch's job `job`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lane {
    /// Index of the job in the batch.
    pub job: usize,
    /// Index of the frame in the job.
    pub frame: usize,
}

/// What the plan needs to know of one job of the batch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct JobShape {
    /// Frames to render (an image is one).
    pub frames: usize,
    /// The job's guidance scale; above 1 it asks for guidance.
    pub guidance: f64,
}

/// How the UNet takes the guidance scale.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnetGuidance {
    /// Classifier-free guidance: an unconditional pass beside the conditional one, as a second
    /// row per lane.
    SecondPass,
    /// As an embedding (`timestep_cond`, LCM-distilled UNets): one row per lane, whatever the
    /// scale.
    Embedded,
}

/// A row of a UNet run: which prompt embedding goes with a lane's latent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Row {
    /// The negative prompt's embedding of this job.
    Unconditional(usize),
    /// The prompt's embedding of this job.
    Conditional(usize),
}

/// How a batch runs through the UNet, decided once before the first run.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchPlan {
    /// Classifier-free guidance for the whole batch: two rows per lane, every lane's
    /// unconditional row first, then every lane's conditional row.
    pub guided: bool,
    /// Per job, the scale its noise prediction is guided with (`uncond + scale × (cond −
    /// uncond)`); `None`: its conditional prediction as it is.
    pub scales: Vec<Option<f64>>,
    /// The lanes of each chunk, in order: every job's frames, job after job.
    pub chunks: Vec<Vec<Lane>>,
    /// Per job, the steps it reports in all: the step count once for each chunk it has lanes in.
    pub totals: Vec<u32>,
}

/// One step's UNet run of one chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnetRun {
    /// The lanes that take part, in the order of their latents.
    pub lanes: Vec<Lane>,
    /// The UNet's rows, in order (see [`BatchPlan::guided`]).
    pub rows: Vec<Row>,
    /// The jobs with lanes in the run, once each: each reports one more step after it.
    pub jobs: Vec<usize>,
}

/// Plans a batch of jobs of one size (`latent_pixels`: the latent's height × width) and step
/// count: whether it is guided, and which lanes run together.
pub fn plan(
    jobs: &[JobShape],
    steps: u32,
    latent_pixels: usize,
    max_unet_rows: usize,
    unet: UnetGuidance,
) -> BatchPlan {
    // One guided job makes the whole batch guided: a UNet run takes one layout of rows. The
    // batching policy keeps guided and unguided jobs apart, so this costs nothing in practice.
    let guided = unet == UnetGuidance::SecondPass && jobs.iter().any(|job| job.guidance > 1.0);
    let scales = jobs.iter().map(|job| (guided && job.guidance > 1.0).then_some(job.guidance)).collect();
    let rows_per_lane = if guided { 2 } else { 1 };
    let lanes_per_run = (max_unet_rows * ROW_LATENT_PIXELS / latent_pixels.max(1) / rows_per_lane).max(1);
    let lanes: Vec<Lane> = jobs
        .iter()
        .enumerate()
        .flat_map(|(job, shape)| (0..shape.frames.max(1)).map(move |frame| Lane { job, frame }))
        .collect();
    let chunks: Vec<Vec<Lane>> = lanes.chunks(lanes_per_run).map(<[Lane]>::to_vec).collect();
    let mut totals = vec![0; jobs.len()];
    for chunk in &chunks {
        for job in jobs_of(chunk) {
            totals[job] += steps;
        }
    }
    BatchPlan { guided, scales, chunks, totals }
}

impl BatchPlan {
    /// UNet rows per lane: two with classifier-free guidance, else one.
    pub fn rows_per_lane(&self) -> usize {
        if self.guided { 2 } else { 1 }
    }

    /// The run for one step of chunk `chunk`, given which jobs are still rendering (by index in
    /// the batch); `None` when no lane of the chunk is.
    pub fn run(&self, chunk: usize, rendering: &[bool]) -> Option<UnetRun> {
        let lanes: Vec<Lane> = self.chunks.get(chunk)?.iter().copied().filter(|lane| rendering[lane.job]).collect();
        if lanes.is_empty() {
            return None;
        }
        let conditional = lanes.iter().map(|lane| Row::Conditional(lane.job));
        let rows = match self.guided {
            true => lanes.iter().map(|lane| Row::Unconditional(lane.job)).chain(conditional).collect(),
            false => conditional.collect(),
        };
        Some(UnetRun { jobs: jobs_of(&lanes), lanes, rows })
    }

    /// Where the `k`th lane of a run of `lanes` lanes finds its predictions in the UNet's
    /// output: its conditional row, and its unconditional row when the batch is guided.
    pub fn prediction_rows(&self, k: usize, lanes: usize) -> (usize, Option<usize>) {
        match self.guided {
            true => (lanes + k, Some(k)),
            false => (k, None),
        }
    }
}

/// The jobs of `lanes` (which come job after job), once each.
fn jobs_of(lanes: &[Lane]) -> Vec<usize> {
    let mut jobs: Vec<usize> = lanes.iter().map(|lane| lane.job).collect();
    jobs.dedup();
    jobs
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 512×512, 128×128 and 1024×1024 images, in latent pixels.
    const LARGE: usize = 64 * 64;
    const SMALL: usize = 16 * 16;
    const HUGE: usize = 128 * 128;

    struct Case {
        name: &'static str,
        /// (frames, guidance) per job.
        jobs: &'static [(usize, f64)],
        steps: u32,
        latent_pixels: usize,
        max_unet_rows: usize,
        unet: UnetGuidance,
        /// (job, chunk, step): the job stops just before that step of that chunk.
        stops: &'static [(usize, usize, u32)],
        guided: bool,
        scales: &'static [Option<f64>],
        totals: &'static [u32],
        /// Each UNet run, `chunk.step: lanes (job.frame) | rows`, or `chunk.step: -` when the
        /// chunk has no lane left and ends.
        runs: &'static [&'static str],
    }

    const CASES: &[Case] = &[
        Case {
            name: "one image without guidance: one row per step",
            jobs: &[(1, 1.0)],
            steps: 2,
            latent_pixels: LARGE,
            max_unet_rows: 4,
            unet: UnetGuidance::SecondPass,
            stops: &[],
            guided: false,
            scales: &[None],
            totals: &[2],
            runs: &["0.0: 0.0 | c0", "0.1: 0.0 | c0"],
        },
        Case {
            name: "one guided image: its unconditional and conditional rows in one run",
            jobs: &[(1, 7.5)],
            steps: 2,
            latent_pixels: LARGE,
            max_unet_rows: 4,
            unet: UnetGuidance::SecondPass,
            stops: &[],
            guided: true,
            scales: &[Some(7.5)],
            totals: &[2],
            runs: &["0.0: 0.0 | u0 c0", "0.1: 0.0 | u0 c0"],
        },
        Case {
            name: "several jobs share each run, all unconditional rows first",
            jobs: &[(1, 7.5), (2, 5.0)],
            steps: 1,
            latent_pixels: SMALL,
            max_unet_rows: 4,
            unet: UnetGuidance::SecondPass,
            stops: &[],
            guided: true,
            scales: &[Some(7.5), Some(5.0)],
            totals: &[1, 1],
            runs: &["0.0: 0.0 1.0 1.1 | u0 u1 u1 c0 c1 c1"],
        },
        Case {
            name: "chunked at max_unet_rows: a job in two chunks reports both",
            jobs: &[(3, 7.5), (1, 7.5)],
            steps: 2,
            latent_pixels: LARGE,
            max_unet_rows: 4,
            unet: UnetGuidance::SecondPass,
            stops: &[],
            guided: true,
            scales: &[Some(7.5), Some(7.5)],
            totals: &[4, 2],
            runs: &[
                "0.0: 0.0 0.1 | u0 u0 c0 c0",
                "0.1: 0.0 0.1 | u0 u0 c0 c0",
                "1.0: 0.2 1.0 | u0 u1 c0 c1",
                "1.1: 0.2 1.0 | u0 u1 c0 c1",
            ],
        },
        Case {
            name: "without guidance a run holds twice the lanes",
            jobs: &[(3, 1.0), (1, 0.0)],
            steps: 1,
            latent_pixels: LARGE,
            max_unet_rows: 4,
            unet: UnetGuidance::SecondPass,
            stops: &[],
            guided: false,
            scales: &[None, None],
            totals: &[1, 1],
            runs: &["0.0: 0.0 0.1 0.2 1.0 | c0 c0 c0 c1"],
        },
        Case {
            name: "an image larger than max_unet_rows allows still runs, alone",
            jobs: &[(2, 7.5)],
            steps: 1,
            latent_pixels: HUGE,
            max_unet_rows: 1,
            unet: UnetGuidance::SecondPass,
            stops: &[],
            guided: true,
            scales: &[Some(7.5)],
            totals: &[2],
            runs: &["0.0: 0.0 | u0 c0", "1.0: 0.1 | u0 c0"],
        },
        Case {
            name: "an embedded-guidance UNet takes one row per lane whatever the scale",
            jobs: &[(1, 8.0), (1, 1.5)],
            steps: 1,
            latent_pixels: LARGE,
            max_unet_rows: 4,
            unet: UnetGuidance::Embedded,
            stops: &[],
            guided: false,
            scales: &[None, None],
            totals: &[1, 1],
            runs: &["0.0: 0.0 1.0 | c0 c1"],
        },
        Case {
            name: "one guided job guides the batch; an unguided one keeps its conditional prediction",
            jobs: &[(1, 7.5), (1, 1.0)],
            steps: 1,
            latent_pixels: LARGE,
            max_unet_rows: 4,
            unet: UnetGuidance::SecondPass,
            stops: &[],
            guided: true,
            scales: &[Some(7.5), None],
            totals: &[1, 1],
            runs: &["0.0: 0.0 1.0 | u0 u1 c0 c1"],
        },
        Case {
            name: "a job canceled midway leaves the later steps; the other goes on",
            jobs: &[(1, 7.5), (2, 7.5)],
            steps: 3,
            latent_pixels: SMALL,
            max_unet_rows: 4,
            unet: UnetGuidance::SecondPass,
            stops: &[(0, 0, 1)],
            guided: true,
            scales: &[Some(7.5), Some(7.5)],
            totals: &[3, 3],
            runs: &["0.0: 0.0 1.0 1.1 | u0 u1 u1 c0 c1 c1", "0.1: 1.0 1.1 | u1 u1 c1 c1", "0.2: 1.0 1.1 | u1 u1 c1 c1"],
        },
        Case {
            name: "a stopped job's later chunks run nothing; a chunk with no lane left ends at once",
            jobs: &[(1, 7.5), (2, 7.5)],
            steps: 2,
            latent_pixels: LARGE,
            max_unet_rows: 2,
            unet: UnetGuidance::SecondPass,
            stops: &[(1, 1, 1)],
            guided: true,
            scales: &[Some(7.5), Some(7.5)],
            totals: &[2, 4],
            runs: &["0.0: 0.0 | u0 c0", "0.1: 0.0 | u0 c0", "1.0: 1.0 | u1 c1", "1.1: -", "2.0: -"],
        },
        Case {
            name: "every job stopped before the first step: no run at all",
            jobs: &[(1, 1.0), (1, 1.0)],
            steps: 4,
            latent_pixels: SMALL,
            max_unet_rows: 4,
            unet: UnetGuidance::SecondPass,
            stops: &[(0, 0, 0), (1, 0, 0)],
            guided: false,
            scales: &[None, None],
            totals: &[4, 4],
            runs: &["0.0: -"],
        },
    ];

    /// Steps through the plan as the pipeline does, applying `stops` before each step.
    fn runs(plan: &BatchPlan, case: &Case) -> Vec<String> {
        let mut rendering = vec![true; case.jobs.len()];
        let mut runs = Vec::new();
        for chunk in 0..plan.chunks.len() {
            for step in 0..case.steps {
                for &(job, _, _) in case.stops.iter().filter(|stop| (stop.1, stop.2) == (chunk, step)) {
                    rendering[job] = false;
                }
                let Some(run) = plan.run(chunk, &rendering) else {
                    runs.push(format!("{chunk}.{step}: -"));
                    break;
                };
                let lanes: Vec<String> = run.lanes.iter().map(|lane| format!("{}.{}", lane.job, lane.frame)).collect();
                let rows: Vec<String> = run
                    .rows
                    .iter()
                    .map(|row| match row {
                        Row::Unconditional(job) => format!("u{job}"),
                        Row::Conditional(job) => format!("c{job}"),
                    })
                    .collect();
                let mut jobs: Vec<usize> = run.lanes.iter().map(|lane| lane.job).collect();
                jobs.dedup();
                assert_eq!(run.jobs, jobs, "{}: each job of the run reports once", case.name);
                runs.push(format!("{chunk}.{step}: {} | {}", lanes.join(" "), rows.join(" ")));
            }
        }
        runs
    }

    #[test]
    fn the_plan_of_each_batch() {
        for case in CASES {
            let jobs: Vec<JobShape> =
                case.jobs.iter().map(|&(frames, guidance)| JobShape { frames, guidance }).collect();
            let plan = plan(&jobs, case.steps, case.latent_pixels, case.max_unet_rows, case.unet);
            assert_eq!(plan.guided, case.guided, "{}: guided", case.name);
            assert_eq!(plan.scales, case.scales, "{}: scales", case.name);
            assert_eq!(plan.totals, case.totals, "{}: totals", case.name);
            assert_eq!(runs(&plan, case), case.runs, "{}: runs", case.name);
        }
    }

    #[test]
    fn predictions_are_read_from_the_rows_the_plan_laid_out() {
        let guided = plan(&[JobShape { frames: 3, guidance: 7.5 }], 1, SMALL, 4, UnetGuidance::SecondPass);
        let run = guided.run(0, &[true]).unwrap();
        for k in 0..run.lanes.len() {
            let (cond, uncond) = guided.prediction_rows(k, run.lanes.len());
            assert_eq!(run.rows[cond], Row::Conditional(run.lanes[k].job));
            assert_eq!(uncond.map(|row| run.rows[row]), Some(Row::Unconditional(run.lanes[k].job)));
        }
        let plain = plan(&[JobShape { frames: 3, guidance: 1.0 }], 1, SMALL, 4, UnetGuidance::SecondPass);
        assert_eq!(plain.prediction_rows(2, 3), (2, None));
        assert_eq!(plain.rows_per_lane(), 1);
        assert_eq!(guided.rows_per_lane(), 2);
    }
}
