{{/*
Names, labels, the operator's command line and environment, and the RBAC rules: each defined once here.
*/}}

{{- define "distillery.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "distillery.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The name of the release's cluster-scoped objects (ClusterRole, ClusterRoleBinding): the full name and
the release namespace, so that releases of the same name in different namespaces (one namespaced
operator per business unit: `helm install distillery -n bu-1`, `-n bu-2`) own distinct objects. The
CRD is the one shared cluster-scoped object, and Helm installs it from crds/ (never templated).
*/}}
{{- define "distillery.clusterName" -}}
{{- printf "%s-%s" (include "distillery.fullname" .) .Release.Namespace | trunc 253 | trimSuffix "-" }}
{{- end }}

{{- define "distillery.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "distillery.selectorLabels" -}}
app.kubernetes.io/name: {{ include "distillery.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "distillery.labels" -}}
helm.sh/chart: {{ include "distillery.chart" . }}
{{ include "distillery.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: distillery
{{- end }}

{{- define "distillery.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "distillery.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The labels of the operator's metrics Service: what the ServiceMonitor selects. */}}
{{- define "distillery.metricsLabels" -}}
{{ include "distillery.selectorLabels" . }}
distillery.dev/metrics: "true"
{{- end }}

{{- define "distillery.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/*
The namespaces a namespaced operator watches: rbac.watchNamespaces, or the release namespace.
Rendered as a JSON list (include returns a string); fromJsonArray turns it back.
*/}}
{{- define "distillery.watchNamespaces" -}}
{{- if .Values.rbac.watchNamespaces }}
{{- .Values.rbac.watchNamespaces | uniq | toJson }}
{{- else }}
{{- list .Release.Namespace | toJson }}
{{- end }}
{{- end }}

{{- define "distillery.namespaced" -}}
{{- if eq .Values.rbac.scope "namespaced" }}true{{ end }}
{{- end }}

{{/*
The operator's command line after the image's entrypoint (`distillery operator`): scope, kopf's health
endpoint, the metrics endpoint, log level. Every workload default travels as an environment variable
instead (below).
*/}}
{{- define "distillery.operatorArgs" -}}
{{- if include "distillery.namespaced" . }}
{{- range include "distillery.watchNamespaces" . | fromJsonArray }}
- --namespace={{ . }}
{{- end }}
{{- else }}
- --all-namespaces
{{- end }}
- --liveness=http://0.0.0.0:{{ .Values.operator.probePort }}/healthz
{{- if .Values.metrics.enabled }}
- --metrics=http://0.0.0.0:{{ .Values.metrics.port }}/metrics
{{- end }}
{{- if eq .Values.operator.logLevel "info" }}
- --verbose
{{- else if eq .Values.operator.logLevel "debug" }}
- --debug
{{- end }}
{{- end }}

{{/*
values → the operator's DISTILLERY_* settings: the chart's one coupling to the operator's settings.
Empty values set nothing, so the operator's own default applies; the numbers are always set (0 means
"none" to the operator, not "its default").
*/}}
{{- define "distillery.operatorEnv" -}}
{{- $w := .Values.workloads }}
{{- $env := dict
  "DISTILLERY_TRAINER_IMAGE" $w.trainerImage
  "DISTILLERY_VLLM_IMAGE" $w.vllmImage
  "DISTILLERY_IMAGE_PULL_POLICY" $w.imagePullPolicy
  "DISTILLERY_GPU_RESOURCE" $w.gpuResource
  "DISTILLERY_TRAINING_RUNTIME" $w.trainingRuntime
  "DISTILLERY_PRIORITY_CLASS" $w.priorityClassName
  "DISTILLERY_QUEUE_NAME" $w.kueue.queueName
  "DISTILLERY_STORAGE_CLASS" $w.storageClassName
  "DISTILLERY_COLLECT_DEADLINE_SECONDS" (int64 $w.deadlines.collectSeconds | toString)
  "DISTILLERY_TRAIN_DEADLINE_SECONDS" (int64 $w.deadlines.trainSeconds | toString)
  "DISTILLERY_EVALUATE_DEADLINE_SECONDS" (int64 $w.deadlines.evaluateSeconds | toString)
  "DISTILLERY_STALL_TIMEOUT_SECONDS" (int64 $w.stallTimeoutSeconds | toString)
  "DISTILLERY_SHM_SIZE" $w.shmSize
  "DISTILLERY_COLLECTION_RESOURCES" (toJson $w.resources.collection)
  "DISTILLERY_EVALUATION_RESOURCES" (toJson $w.resources.evaluation)
  "DISTILLERY_TRAINING_RESOURCES" (toJson $w.resources.training)
  "DISTILLERY_VLLM_RESOURCES" (toJson $w.resources.vllm)
}}
{{- if $w.nodeSelector }}
{{- $_ := set $env "DISTILLERY_NODE_SELECTOR" (toJson $w.nodeSelector) }}
{{- end }}
{{- if $w.tolerations }}
{{- $_ := set $env "DISTILLERY_TOLERATIONS" (toJson $w.tolerations) }}
{{- end }}
{{- if kindIs "invalid" $w.runAsUser }}
{{- $_ := set $env "DISTILLERY_RUN_AS_USER" "none" }}
{{- else }}
{{- $_ := set $env "DISTILLERY_RUN_AS_USER" (printf "%d" (int64 $w.runAsUser)) }}
{{- end }}
{{- if not .Values.operator.liveProgress }}
{{- $_ := set $env "DISTILLERY_LIVE_PROGRESS" "false" }}
{{- end }}
{{- /* The platform's policy: always set, so an empty list means "nothing" rather than "the default". */}}
{{- $p := .Values.policy }}
{{- $_ := set $env "DISTILLERY_ALLOWED_IMAGE_PREFIXES" (toJson $p.allowedImagePrefixes) }}
{{- $_ := set $env "DISTILLERY_ALLOW_SCHEDULING_OVERRIDES" (ternary "true" "false" $p.allowSchedulingOverrides) }}
{{- $_ := set $env "DISTILLERY_ALLOWED_PRIORITY_CLASSES" (toJson $p.allowedPriorityClasses) }}
{{- $_ := set $env "DISTILLERY_VLLM_ARGS_ALLOWLIST" (toJson $p.vllmArgsAllowlist) }}
{{- range $name := keys $env | sortAlpha }}
{{- with get $env $name }}
- name: {{ $name }}
  value: {{ . | quote }}
{{- end }}
{{- end }}
{{- end }}

{{/*
RBAC: exactly the verbs the operator uses on exactly the kinds it manages, and nothing on Secrets
(pods receive API keys as secretKeyRefs; the operator never reads them). tests/chart/test_rbac.py
checks these rules against every request the operator makes in its integration tests.
*/}}

{{/* In every namespace the operator works in. */}}
{{- define "distillery.rules.namespaced" -}}
# DistillationRuns: watched; only their status is written.
- apiGroups: [distillery.dev]
  resources: [distillationruns]
  verbs: [list, watch]
- apiGroups: [distillery.dev]
  resources: [distillationruns/status]
  verbs: [patch]
# Children carry an owner reference with blockOwnerDeletion: true; under the
# OwnerReferencesPermissionEnforcement admission plugin (OpenShift) setting it needs update on the
# owner's finalizers. The operator never writes a run's finalizers.
- apiGroups: [distillery.dev]
  resources: [distillationruns/finalizers]
  verbs: [update]
# The children of a run: created, read back when creating finds one already there, and watched.
# The stage configuration and the serving objects are patched when the spec changes; Jobs and
# PyTorchJobs and TrainJobs are immutable, so a changed stage deletes and recreates them. ConfigMaps go with
# their run (owner references): never deleted by the operator.
- apiGroups: [""]
  resources: [configmaps]
  verbs: [get, list, watch, create, patch]
- apiGroups: [""]
  resources: [services]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [apps]
  resources: [deployments]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [batch]
  resources: [jobs]
  verbs: [get, list, watch, create, delete]
- apiGroups: [kubeflow.org]
  resources: [pytorchjobs]
  verbs: [get, list, watch, create, delete]
# Kubeflow Trainer v2's TrainJobs, the same way (immutable: a changed stage deletes and recreates one).
- apiGroups: [trainer.kubeflow.org]
  resources: [trainjobs]
  verbs: [get, list, watch, create, delete]
# The claim a run asks the operator to create (storage.pvc.create): created once, read back when
# creating finds one already there, watched (every claim: a run may name one someone else made).
# Never patched (a claim's spec is immutable) and never deleted (the run's owner reference does that
# when the run asks for it).
- apiGroups: [""]
  resources: [persistentvolumeclaims]
  verbs: [get, list, watch, create]
# Pods, read-only: the stages report through their termination messages.
- apiGroups: [""]
  resources: [pods]
  verbs: [list, watch]
{{- if .Values.operator.liveProgress }}
# While training or collection runs, the tail of rank 0's and each shard's log: their live progress
# (the operator reads only the pods of its own runs, found through the labels it set).
- apiGroups: [""]
  resources: [pods/log]
  verbs: [get]
{{- end }}
# kopf posts Events about each run.
- apiGroups: [""]
  resources: [events]
  verbs: [create]
{{- end }}

{{/* Cluster-scoped reads: kopf follows the cluster's resources (and, namespaced, its namespaces); the operator reads StorageClasses and ClusterTrainingRuntimes. */}}
{{- define "distillery.rules.cluster" -}}
# kopf notices CRDs installed after it started (Kubeflow's PyTorchJob, Trainer v2's TrainJob).
- apiGroups: [apiextensions.k8s.io]
  resources: [customresourcedefinitions]
  verbs: [list, watch]
# While a run's claim is Pending: does its StorageClass bind at once (wait for it) or only for the
# first pod that uses it (WaitForFirstConsumer: start the pods, which bind it)?
- apiGroups: [storage.k8s.io]
  resources: [storageclasses]
  verbs: [get]
# Before creating a TrainJob: does the ClusterTrainingRuntime it references exist (a missing one is a
# status message instead of a TrainJob that never starts)?
- apiGroups: [trainer.kubeflow.org]
  resources: [clustertrainingruntimes]
  verbs: [get]
{{- if include "distillery.namespaced" . }}
# kopf learns which of the watched namespaces exist.
- apiGroups: [""]
  resources: [namespaces]
  verbs: [list, watch]
{{- end }}
{{- end }}
