//! One AdmissionReview v1: the pod in the request, injected, the difference as a
//! JSONPatch (RFC 6902) in the response. Pure: no I/O, so every malformed input is a
//! unit test away.

use base64::Engine;
use serde_json::{json, Value as Json};

use super::config::OnError;
use crate::inject::{inject_object, Options, Outcome};

/// What the webhook answers: an HTTP status and a JSON body.
pub struct Answer {
    pub status: u16,
    pub body: Json,
    /// For the log: what happened.
    pub summary: String,
}

fn answer(status: u16, body: Json, summary: String) -> Answer {
    Answer {
        status,
        body,
        summary,
    }
}

/// A review whose `request.uid` cannot be read cannot be answered as a review: 400.
fn bad_request(problem: &str) -> Answer {
    answer(
        400,
        json!({"error": problem}),
        format!("malformed review: {problem}"),
    )
}

fn response(uid: &str, fields: Json) -> Json {
    let mut r = json!({"uid": uid});
    if let (Some(r), Some(f)) = (r.as_object_mut(), fields.as_object()) {
        r.extend(f.clone());
    }
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "response": r,
    })
}

/// Answers the review in `body`.
pub fn review(body: &[u8], opts: &Options, on_error: OnError) -> Answer {
    let Ok(doc) = serde_json::from_slice::<Json>(body) else {
        return bad_request("the body is not JSON");
    };
    if doc.get("kind").and_then(Json::as_str) != Some("AdmissionReview")
        || doc.get("apiVersion").and_then(Json::as_str) != Some("admission.k8s.io/v1")
    {
        return bad_request("not an admission.k8s.io/v1 AdmissionReview");
    }
    let Some(req) = doc.get("request") else {
        return bad_request("no request");
    };
    let Some(uid) = req.get("uid").and_then(Json::as_str) else {
        return bad_request("request.uid missing");
    };
    // From here on every answer is a review response for `uid`.
    let refuse = |code: u16, message: String| {
        answer(
            200,
            response(
                uid,
                json!({"allowed": false, "status": {"code": code, "message": message}}),
            ),
            format!("refused {uid}: {message}"),
        )
    };
    let allow_as_is = |summary: String, warning: Option<String>| {
        let mut fields = json!({"allowed": true});
        if let Some(w) = warning {
            fields["warnings"] = json!([w]);
        }
        answer(200, response(uid, fields), summary)
    };
    let kind = req.pointer("/kind/kind").and_then(Json::as_str);
    let group = req.pointer("/kind/group").and_then(Json::as_str);
    if kind != Some("Pod") || group.is_some_and(|g| !g.is_empty()) {
        return refuse(
            400,
            format!(
                "svidcar injects pods; this review is for {}",
                kind.unwrap_or("nothing")
            ),
        );
    }
    if req.get("operation").and_then(Json::as_str) != Some("CREATE") {
        return allow_as_is(format!("{uid}: not a CREATE, allowed unchanged"), None);
    }
    let Some(pod) = req.get("object").filter(|o| o.is_object()) else {
        return refuse(400, "request.object: no pod in the review".into());
    };
    // The API server sends the pod with its kind; a review without one is still a pod.
    let mut with_kind = pod.clone();
    let had_kind = pod.get("kind").is_some();
    if !had_kind {
        with_kind["kind"] = json!("Pod");
    }
    let mut yaml: serde_norway::Value = match serde_norway::to_value(&with_kind) {
        Ok(v) => v,
        Err(e) => return refuse(400, format!("request.object: {e}")),
    };
    let name = pod
        .pointer("/metadata/name")
        .or_else(|| pod.pointer("/metadata/generateName"))
        .and_then(Json::as_str)
        .unwrap_or("(unnamed)");
    let ns = req.get("namespace").and_then(Json::as_str).unwrap_or("");
    let who = format!("pod {ns}/{name}");
    let outcomes = inject_object(&mut yaml, opts);
    let outcome = outcomes.into_iter().next().map(|(_, o)| o);
    match outcome {
        Some(Ok(Outcome::Injected)) => {}
        Some(Ok(other)) => {
            return allow_as_is(format!("{who}: {other:?}, allowed unchanged"), None)
        }
        Some(Err(e)) => {
            let message = format!("svidcar cannot inject {who}: {e}");
            return match on_error {
                OnError::Allow => allow_as_is(message.clone(), Some(message)),
                OnError::Deny => refuse(400, message),
            };
        }
        None => return refuse(400, "request.object: not a pod".into()),
    }
    let mut injected: Json = match serde_json::to_value(&yaml) {
        Ok(v) => v,
        Err(e) => return refuse(500, format!("injected pod as JSON: {e}")),
    };
    if !had_kind {
        if let Some(o) = injected.as_object_mut() {
            o.remove("kind");
        }
    }
    let patch = json_patch::diff(pod, &injected);
    let patch_text = match serde_json::to_vec(&patch) {
        Ok(p) => p,
        Err(e) => return refuse(500, format!("patch as JSON: {e}")),
    };
    answer(
        200,
        response(
            uid,
            json!({
                "allowed": true,
                "patchType": "JSONPatch",
                "patch": base64::engine::general_purpose::STANDARD.encode(patch_text),
            }),
        ),
        format!("{who}: injected"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn review_of(request: Json) -> Json {
        json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": request})
    }

    fn pod() -> Json {
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
               "spec": {"containers": [{"name": "app", "image": "app:1"}]}})
    }

    fn run(body: &Json) -> Answer {
        review(
            &serde_json::to_vec(body).unwrap(),
            &Options::default(),
            OnError::Allow,
        )
    }

    #[test]
    fn a_pod_gets_a_patch_and_the_uid_back() {
        let a = run(&review_of(
            json!({"uid": "u-1", "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "operation": "CREATE", "namespace": "shop", "object": pod()}),
        ));
        assert_eq!(a.status, 200);
        assert_eq!(a.body["response"]["uid"], "u-1");
        assert_eq!(a.body["response"]["allowed"], true);
        assert_eq!(a.body["response"]["patchType"], "JSONPatch");
        let patch = base64::engine::general_purpose::STANDARD
            .decode(a.body["response"]["patch"].as_str().unwrap())
            .unwrap();
        let patch: json_patch::Patch = serde_json::from_slice(&patch).unwrap();
        let mut p = pod();
        json_patch::patch(&mut p, &patch).unwrap();
        assert_eq!(p["spec"]["initContainers"][1]["name"], "svidcar");
    }

    #[test]
    fn malformed_reviews_get_errors_not_crashes() {
        for body in [
            &b"garbage"[..],
            b"{}",
            b"[]",
            b"null",
            b"{\"kind\":\"AdmissionReview\"}",
        ] {
            let a = review(body, &Options::default(), OnError::Allow);
            assert_eq!(a.status, 400, "{}", String::from_utf8_lossy(body));
        }
        let no_uid = run(&review_of(json!({"object": pod()})));
        assert_eq!(no_uid.status, 400);
        let wrong_kind = run(&review_of(
            json!({"uid": "u", "kind": {"group": "apps", "version": "v1", "kind": "Deployment"},
            "operation": "CREATE", "object": {}}),
        ));
        assert_eq!(wrong_kind.body["response"]["allowed"], false);
        assert_eq!(wrong_kind.body["response"]["uid"], "u");
        let no_object = run(&review_of(
            json!({"uid": "u", "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "operation": "CREATE"}),
        ));
        assert_eq!(no_object.body["response"]["allowed"], false);
        let object_not_a_pod = run(&review_of(
            json!({"uid": "u", "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "operation": "CREATE", "object": {"kind": "Pod", "spec": "nonsense"}}),
        ));
        assert_eq!(object_not_a_pod.body["response"]["uid"], "u");
    }

    #[test]
    fn a_pod_that_cannot_be_injected_is_allowed_with_a_warning_or_denied() {
        let mut bad = pod();
        bad["metadata"]["annotations"] = json!({"svidcar.io/mode": "lenient"});
        let body = serde_json::to_vec(&review_of(
            json!({"uid": "u", "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "operation": "CREATE", "object": bad}),
        ))
        .unwrap();
        let a = review(&body, &Options::default(), OnError::Allow);
        assert_eq!(a.body["response"]["allowed"], true);
        assert!(a.body["response"].get("patch").is_none());
        assert!(a.body["response"]["warnings"][0]
            .as_str()
            .unwrap()
            .contains("svidcar.io/mode"));
        let d = review(&body, &Options::default(), OnError::Deny);
        assert_eq!(d.body["response"]["allowed"], false);
        assert!(d.body["response"]["status"]["message"]
            .as_str()
            .unwrap()
            .contains("svidcar.io/mode"));
    }
}
