//! `moe k8s`: a kustomize directory for a checkpoint, read from its
//! config.json alone (no weights needed), so that a model too big for this
//! machine still gets its manifests. What each object is for, and the
//! sizing rules: deploy/README.md.

mod monitoring;
mod objects;
mod sizing;
mod tls;
mod yaml;

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use moe_model::ModelConfig;

/// Ports the containers listen on (the Services use the same numbers).
pub const ROUTER_GRPC_PORT: u16 = 50051;
pub const ROUTER_HTTP_PORT: u16 = 8080;
pub const EXPERT_GRPC_PORT: u16 = 50061;
pub const EXPERT_METRICS_PORT: u16 = 9090;
/// Where the pods mount the checkpoint volume; the model is `/models/NAME`.
pub const MODELS_MOUNT: &str = "/models";

#[derive(Debug, Args)]
pub struct K8sArgs {
    /// The checkpoint directory; only its config.json is read. Pods find it
    /// at /models/NAME, NAME being this directory's name.
    #[arg(long)]
    pub model: PathBuf,
    /// The container image holding router-svc and expert-svc (deploy/Dockerfile.cuda).
    #[arg(long)]
    pub image: String,
    /// The directory to write (created; generated files in it are replaced).
    #[arg(long)]
    pub out: PathBuf,
    /// The namespace every object goes to (created by the manifests).
    #[arg(long, default_value = "moe")]
    pub namespace: String,
    /// Fewest replicas of each expert (or layer shard) the autoscaler keeps.
    #[arg(long, default_value_t = 1)]
    pub min_replicas: u32,
    /// Most replicas of each expert (or layer shard): one GPU each.
    #[arg(long, default_value_t = 4)]
    pub max_replicas: u32,
    /// Split each expert's layers into shards of at most N layers, one
    /// Deployment (and GPU per replica) each, for experts bigger than a GPU.
    #[arg(long)]
    pub layers_per_shard: Option<usize>,
    /// The extended resource that names a GPU on the nodes.
    #[arg(long, default_value = "nvidia.com/gpu")]
    pub gpu_resource: String,
    /// A node label KEY=VALUE the expert pods must run on (repeatable).
    #[arg(long = "node-selector", value_name = "KEY=VALUE", value_parser = parse_node_label)]
    pub node_selector: Vec<(String, String)>,
    /// `hpa` (autoscaling/v2 through prometheus-adapter) or `keda` (a KEDA ScaledObject).
    #[arg(long, value_enum, default_value_t = Autoscaler::Hpa)]
    pub autoscaler: Autoscaler,
    /// The experts' (and the router's) weight dtype; default: the checkpoint's.
    #[arg(long, value_enum)]
    pub dtype: Option<Dtype>,
    /// The Prometheus KEDA queries (with --autoscaler keda).
    #[arg(long, default_value = "http://prometheus-operated.monitoring.svc:9090")]
    pub prometheus_url: String,
    /// TLS on the router's API and mutual TLS between router and experts,
    /// with certificates mounted from the Secrets router-tls,
    /// router-expert-client-tls and expert-tls (deploy/README.md).
    #[arg(long)]
    pub tls: bool,
    /// With --tls: cert-manager Certificates that make those Secrets, from
    /// this issuer: NAME (an Issuer in the namespace) or ClusterIssuer/NAME.
    #[arg(long, value_name = "ISSUER", requires = "tls")]
    pub cert_manager: Option<tls::IssuerRef>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Autoscaler {
    Hpa,
    Keda,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Dtype {
    Bf16,
    F16,
    F32,
}

impl Dtype {
    pub fn bytes(self) -> u64 {
        match self {
            Self::Bf16 | Self::F16 => 2,
            Self::F32 => 4,
        }
    }

    /// The dtype config.json names (`torch_dtype` or `dtype`).
    fn of_checkpoint(name: &str) -> Option<Self> {
        match name {
            "bfloat16" => Some(Self::Bf16),
            "float16" => Some(Self::F16),
            "float32" => Some(Self::F32),
            _ => None,
        }
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Bf16 => "bf16",
            Self::F16 => "f16",
            Self::F32 => "f32",
        })
    }
}

fn parse_node_label(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_owned(), value.to_owned())),
        _ => Err(format!("{text:?}: expected KEY=VALUE")),
    }
}

/// One Deployment of expert-svc: an expert, or one layer shard of it.
#[derive(Debug, Clone)]
pub struct ExpertUnit {
    pub expert: usize,
    /// `None`: every layer (no sharding).
    pub layers: Option<Range<usize>>,
    /// The Deployment's, Service's, PDB's and autoscaler's name.
    pub name: String,
}

/// Everything the objects are made from, validated.
#[derive(Debug)]
pub struct Plan {
    pub config: ModelConfig,
    /// The checkpoint's directory name: the pods read `/models/NAME`.
    pub model_name: String,
    pub namespace: String,
    pub image: String,
    pub dtype: Dtype,
    pub checkpoint_dtype: Dtype,
    pub min_replicas: u32,
    pub max_replicas: u32,
    pub gpu_resource: String,
    pub node_selector: BTreeMap<String, String>,
    pub autoscaler: Autoscaler,
    pub prometheus_url: String,
    pub units: Vec<ExpertUnit>,
    /// `--tls`, and `--cert-manager`'s issuer.
    pub tls: bool,
    pub cert_manager: Option<tls::IssuerRef>,
}

impl Plan {
    pub fn new(args: &K8sArgs) -> anyhow::Result<Self> {
        let config_path = args.model.join("config.json");
        let config = ModelConfig::from_file(&config_path)?;
        let model_name = args
            .model
            .canonicalize()
            .with_context(|| format!("{}", args.model.display()))?
            .file_name()
            .and_then(|name| name.to_str())
            .map(str::to_owned)
            .context("--model: the directory needs a UTF-8 name")?;
        if !is_dns_label(&args.namespace) {
            bail!(
                "--namespace {:?}: expected a DNS label (lowercase letters, digits, '-')",
                args.namespace
            );
        }
        if args.min_replicas == 0 || args.max_replicas < args.min_replicas {
            bail!(
                "--min-replicas {} and --max-replicas {}: expected 1 <= min <= max",
                args.min_replicas,
                args.max_replicas
            );
        }
        let checkpoint_dtype = Dtype::of_checkpoint(&config.dtype).with_context(|| {
            format!(
                "{}: dtype {:?} is not bfloat16, float16 or float32",
                config_path.display(),
                config.dtype
            )
        })?;
        let layers = config.num_hidden_layers;
        let shards = match args.layers_per_shard {
            Some(0) => bail!("--layers-per-shard must be positive"),
            Some(per_shard) if per_shard < layers => Some(sizing::shards(layers, per_shard)),
            _ => None,
        };
        let units = (0..config.num_local_experts)
            .flat_map(|expert| match &shards {
                None => vec![ExpertUnit {
                    expert,
                    layers: None,
                    name: format!("expert-{expert}"),
                }],
                Some(shards) => shards
                    .iter()
                    .map(|range| ExpertUnit {
                        expert,
                        layers: Some(range.clone()),
                        name: format!("expert-{expert}-layers-{}-{}", range.start, range.end),
                    })
                    .collect(),
            })
            .collect();
        Ok(Self {
            model_name,
            namespace: args.namespace.clone(),
            image: args.image.clone(),
            dtype: args.dtype.unwrap_or(checkpoint_dtype),
            checkpoint_dtype,
            min_replicas: args.min_replicas,
            max_replicas: args.max_replicas,
            gpu_resource: args.gpu_resource.clone(),
            node_selector: args.node_selector.iter().cloned().collect(),
            autoscaler: args.autoscaler,
            prometheus_url: args.prometheus_url.clone(),
            units,
            tls: args.tls,
            cert_manager: args.cert_manager.clone(),
            config,
        })
    }

    pub fn model_path(&self) -> String {
        format!("{MODELS_MOUNT}/{}", self.model_name)
    }

    /// The layers a unit serves, explicit.
    pub fn layers_of(&self, unit: &ExpertUnit) -> Range<usize> {
        unit.layers
            .clone()
            .unwrap_or(0..self.config.num_hidden_layers)
    }

    /// The name the router resolves for a unit (its headless Service).
    pub fn dns_name(&self, unit: &ExpertUnit) -> String {
        format!("{}.{}.svc.cluster.local", unit.name, self.namespace)
    }
}

fn is_dns_label(text: &str) -> bool {
    !text.is_empty()
        && text.len() <= 63
        && text
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !text.starts_with('-')
        && !text.ends_with('-')
}

/// The generated files, by path under --out.
pub fn render(plan: &Plan) -> anyhow::Result<BTreeMap<PathBuf, String>> {
    let header = format!(
        "# Generated by `moe k8s` from {}/config.json: edit the flags and regenerate\n\
         # (deploy/README.md), not this file.\n",
        plan.model_name
    );
    let with_header = |docs: Vec<serde_json::Value>| format!("{header}{}", yaml::documents(&docs));
    let mut files = BTreeMap::new();
    files.insert(
        "namespace.yaml".into(),
        with_header(vec![objects::namespace(plan)]),
    );
    files.insert(
        "models-volume.yaml".into(),
        with_header(vec![objects::models_volume(plan)]),
    );
    let mut router = objects::router(plan);
    if plan.tls {
        tls::secure_router(&mut router);
    }
    files.insert("router.yaml".into(), with_header(router));
    for unit in &plan.units {
        let mut expert = objects::expert(plan, unit);
        if plan.tls {
            tls::secure_expert(&mut expert);
        }
        files.insert(
            format!("experts/{}.yaml", unit.name).into(),
            with_header(expert),
        );
    }
    if let Some(issuer) = &plan.cert_manager {
        files.insert(
            "certificates.yaml".into(),
            with_header(tls::certificates(plan, issuer)),
        );
    }
    files.insert(
        "monitoring.yaml".into(),
        with_header(monitoring::objects()?),
    );
    // In the order a reader looks for them (kustomize orders by kind anyway).
    let resources: Vec<String> = ["namespace.yaml", "models-volume.yaml", "router.yaml"]
        .map(str::to_owned)
        .into_iter()
        .chain(
            plan.units
                .iter()
                .map(|unit| format!("experts/{}.yaml", unit.name)),
        )
        .chain(["monitoring.yaml".to_owned()])
        .chain(
            plan.cert_manager
                .as_ref()
                .map(|_| "certificates.yaml".to_owned()),
        )
        .collect();
    if plan.autoscaler == Autoscaler::Hpa {
        files.insert(
            monitoring::ADAPTER_CONFIG_FILE.into(),
            with_header(vec![monitoring::adapter_config()]),
        );
    }
    files.insert(
        monitoring::DASHBOARD_FILE.into(),
        monitoring::DASHBOARD.to_owned(),
    );
    files.insert(
        "kustomization.yaml".into(),
        with_header(vec![monitoring::kustomization(plan, &resources)]),
    );
    Ok(files)
}

pub fn run(args: K8sArgs) -> anyhow::Result<()> {
    let plan = Plan::new(&args)?;
    let files = render(&plan)?;
    write(&args.out, &files)?;
    println!(
        "wrote {}: {} files, router + {} expert Deployments ({} experts{}), namespace {}; apply with `kubectl apply -k {}`",
        args.out.display(),
        files.len(),
        plan.units.len(),
        plan.config.num_local_experts,
        match args.layers_per_shard {
            Some(n) if plan.units.len() > plan.config.num_local_experts => format!(
                " × {} layer shards of {n}",
                plan.units.len() / plan.config.num_local_experts
            ),
            _ => String::new(),
        },
        plan.namespace,
        args.out.display()
    );
    Ok(())
}

/// Writes the files, and removes expert files that an earlier run left
/// (another expert count or sharding), so that the directory is exactly
/// what this run generated.
fn write(out: &Path, files: &BTreeMap<PathBuf, String>) -> anyhow::Result<()> {
    let experts = out.join("experts");
    if experts.is_dir() {
        for entry in std::fs::read_dir(&experts)? {
            let path = entry?.path();
            let relative = path.strip_prefix(out)?.to_owned();
            if !files.contains_key(&relative) {
                std::fs::remove_file(&path).with_context(|| format!("{}", path.display()))?;
            }
        }
    }
    for (relative, text) in files {
        let path = out.join(relative);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).with_context(|| format!("{}", parent.display()))?;
        }
        std::fs::write(&path, text).with_context(|| format!("{}", path.display()))?;
    }
    let certificates = Path::new("certificates.yaml");
    if !files.contains_key(certificates) && out.join(certificates).exists() {
        // An earlier run with --cert-manager.
        std::fs::remove_file(out.join(certificates))?;
    }
    let adapter = Path::new(monitoring::ADAPTER_CONFIG_FILE);
    if !files.contains_key(adapter) && out.join(adapter).exists() {
        // An earlier run with --autoscaler hpa.
        std::fs::remove_file(out.join(adapter))?;
    }
    Ok(())
}
