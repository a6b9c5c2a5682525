//! Where the experts are: `--expert` flags or a cluster file.
//!
//! A flag is `E=URI` (expert E, every layer) or `E@A..B=URI` (expert E,
//! layers A to B-1). A URI is `http://HOST:PORT` (`HOST:PORT` alone means
//! the same) or `unix:PATH` for an expert listening on a Unix socket. A
//! cluster file is JSON:
//!
//! ```json
//! {"experts": [{"expert": 0, "endpoint": "http://10.0.0.5:50061", "layers": "0..16"}]}
//! ```
//!
//! Several entries may name the same expert: replicas of it, or processes
//! each serving part of its layers.

use std::ops::Range;
use std::path::Path;

use serde::Deserialize;

use crate::RouterError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpertEndpoint {
    pub expert: usize,
    /// `None`: every layer of the model.
    pub layers: Option<Range<usize>>,
    pub uri: String,
}

#[derive(Deserialize)]
struct ClusterFile {
    experts: Vec<ClusterEntry>,
}

#[derive(Deserialize)]
struct ClusterEntry {
    expert: usize,
    endpoint: String,
    layers: Option<String>,
}

/// Parses one `--expert` flag.
pub fn parse_flag(flag: &str) -> Result<ExpertEndpoint, RouterError> {
    let (target, uri) = flag.split_once('=').ok_or_else(|| {
        RouterError::invalid(format!("--expert {flag:?}: expected E=URI or E@A..B=URI"))
    })?;
    let (expert, layers) = match target.split_once('@') {
        Some((expert, layers)) => (expert, Some(layers)),
        None => (target, None),
    };
    endpoint(
        expert.trim().parse().map_err(|_| {
            RouterError::invalid(format!(
                "--expert {flag:?}: {expert:?} is not an expert number"
            ))
        })?,
        uri,
        layers,
    )
}

fn endpoint(expert: usize, uri: &str, layers: Option<&str>) -> Result<ExpertEndpoint, RouterError> {
    let uri = if uri.contains("://") || uri.starts_with("unix:") {
        uri.to_owned()
    } else {
        format!("http://{uri}")
    };
    Ok(ExpertEndpoint {
        expert,
        layers: layers.map(expert_svc_layers).transpose()?,
        uri,
    })
}

fn expert_svc_layers(text: &str) -> Result<Range<usize>, RouterError> {
    expert_svc::parse_layers(text).map_err(RouterError::invalid)
}

/// Reads a cluster file.
pub fn read_cluster_file(path: &Path) -> Result<Vec<ExpertEndpoint>, RouterError> {
    parse_cluster_file(&std::fs::read_to_string(path)?, path)
}

/// Parses the text of the cluster file at `path` (named in errors).
pub fn parse_cluster_file(text: &str, path: &Path) -> Result<Vec<ExpertEndpoint>, RouterError> {
    let file: ClusterFile = serde_json::from_str(text)
        .map_err(|err| RouterError::invalid(format!("cluster file {}: {err}", path.display())))?;
    file.experts
        .iter()
        .map(|entry| endpoint(entry.expert, &entry.endpoint, entry.layers.as_deref()))
        .collect()
}

/// Per expert, its endpoints and the layers each serves.
pub type ExpertLayout = Vec<Vec<(Range<usize>, ExpertEndpoint)>>;

/// Groups endpoints per expert with their layer ranges, after checking that
/// every expert of the model has an endpoint for every layer.
pub fn layout(
    endpoints: &[ExpertEndpoint],
    num_experts: usize,
    num_layers: usize,
) -> Result<ExpertLayout, RouterError> {
    let mut per_expert: ExpertLayout = vec![Vec::new(); num_experts];
    for endpoint in endpoints {
        let layers = endpoint.layers.clone().unwrap_or(0..num_layers);
        if endpoint.expert >= num_experts || layers.end > num_layers {
            return Err(RouterError::invalid(format!(
                "endpoint {} claims expert {} layers {:?}, but the model has {num_experts} experts and {num_layers} layers",
                endpoint.uri, endpoint.expert, layers
            )));
        }
        per_expert[endpoint.expert].push((layers, endpoint.clone()));
    }
    for (expert, served) in per_expert.iter().enumerate() {
        if let Some(layer) =
            (0..num_layers).find(|l| !served.iter().any(|(range, _)| range.contains(l)))
        {
            return Err(RouterError::invalid(format!(
                "no endpoint serves expert {expert} at layer {layer}"
            )));
        }
    }
    Ok(per_expert)
}

#[cfg(test)]
mod props;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_flags() {
        let e = parse_flag("3=127.0.0.1:5000").unwrap();
        assert_eq!(
            (e.expert, e.layers, e.uri.as_str()),
            (3, None, "http://127.0.0.1:5000")
        );
        let e = parse_flag("1@0..2=http://h:1").unwrap();
        assert_eq!(e.layers, Some(0..2));
        let e = parse_flag("2=unix:/run/moe/expert-2.sock").unwrap();
        assert_eq!(e.uri, "unix:/run/moe/expert-2.sock");
        assert!(parse_flag("x=h:1").is_err());
        assert!(parse_flag("1").is_err());
    }

    #[test]
    fn layout_names_the_uncovered_expert_layer() {
        let endpoints = vec![
            parse_flag("0=h:1").unwrap(),
            parse_flag("1@0..1=h:2").unwrap(),
        ];
        let err = layout(&endpoints, 2, 2).unwrap_err().to_string();
        assert_eq!(err, "no endpoint serves expert 1 at layer 1");
        let mut complete = endpoints;
        complete.push(parse_flag("1@1..2=h:3").unwrap());
        assert_eq!(layout(&complete, 2, 2).unwrap()[1].len(), 2);
    }
}
