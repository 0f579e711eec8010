//! Which ports each API function's routes use: the AWS calls its grants in
//! `terraform/functions.json` allow, and the only adapters (and SDKs) its binary links. Every
//! function authenticates, so each reads the tenants table.

use kiln_app::Ports;
use kiln_aws::AwsPorts;

use crate::Function;

fn authenticated(aws: &AwsPorts) -> Ports {
    Ports { tenants: aws.tenants(), ..aws.none() }
}

/// `POST /v1/jobs`: the tables, the catalog, the job queue; links for a cached answer.
pub fn submit_job(aws: &AwsPorts) -> Ports {
    Ports {
        // The fleet board and the queued index: `quality: auto` reads the backlog per slot.
        fleet: aws.fleet(),
        store: aws.job_store(),
        queue: aws.job_queue(),
        catalog: aws.catalog(),
        links: aws.links(),
        // Init images, read whole when a job names one.
        objects: aws.objects(),
        ..authenticated(aws)
    }
}

/// `GET /v1/jobs/{id}`: the job and its download links.
pub fn get_job(aws: &AwsPorts) -> Ports {
    Ports { store: aws.job_store(), links: aws.links(), fleet: aws.fleet(), ..authenticated(aws) }
}

/// `GET /v1/jobs`.
pub fn list_jobs(aws: &AwsPorts) -> Ports {
    Ports { store: aws.job_store(), ..authenticated(aws) }
}

/// `POST /v1/jobs/{id}/cancel`.
pub fn cancel_job(aws: &AwsPorts) -> Ports {
    Ports { store: aws.job_store(), ..authenticated(aws) }
}

/// `GET /v1/models`.
pub fn list_models(aws: &AwsPorts) -> Ports {
    Ports { catalog: aws.catalog(), ..authenticated(aws) }
}

/// `GET /v1/usage`.
pub fn get_usage(aws: &AwsPorts) -> Ports {
    Ports { store: aws.job_store(), ..authenticated(aws) }
}

/// `GET /v1/webhooks/secret` and its rotation.
pub fn webhook_secret(aws: &AwsPorts) -> Ports {
    Ports { secrets: aws.secrets(), ..authenticated(aws) }
}

/// `POST /v1/uploads`: a presigned PUT.
pub fn create_upload(aws: &AwsPorts) -> Ports {
    Ports { links: aws.links(), ..authenticated(aws) }
}

/// The wiring of `function` (the local server, which serves every route, gets every port).
pub fn for_function(function: Function, aws: &AwsPorts) -> Ports {
    match function {
        Function::SubmitJob => submit_job(aws),
        Function::GetJob => get_job(aws),
        Function::ListJobs => list_jobs(aws),
        Function::CancelJob => cancel_job(aws),
        Function::ListModels => list_models(aws),
        Function::GetUsage => get_usage(aws),
        Function::WebhookSecret => webhook_secret(aws),
        Function::CreateUpload => create_upload(aws),
        Function::All => aws.all(),
    }
}
