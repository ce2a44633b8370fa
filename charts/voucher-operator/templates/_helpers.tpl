{{/* Name of the chart, or nameOverride. */}}
{{- define "voucher-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Full name of the release's objects: DNS-1123, at most 63 characters. */}}
{{- define "voucher-operator.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "voucher-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "voucher-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "voucher-operator.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "voucher-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: catalyst
{{- end -}}

{{/* The pods of one Deployment: `component` is controller or server. */}}
{{- define "voucher-operator.componentSelectorLabels" -}}
{{ include "voucher-operator.selectorLabels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* The ServiceAccount of `component` (controller or server): each Deployment has its own. */}}
{{- define "voucher-operator.serviceAccountName" -}}
{{- $values := .root.Values.serviceAccount -}}
{{- $name := get $values (printf "%sName" .component) -}}
{{- if $values.create -}}
{{- default (printf "%s-%s" (include "voucher-operator.fullname" .root | trunc 52 | trimSuffix "-") .component) $name -}}
{{- else -}}
{{- required (printf "serviceAccount.%sName is required when serviceAccount.create is false" .component) $name -}}
{{- end -}}
{{- end -}}

{{- define "voucher-operator.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{- define "voucher-operator.leaseName" -}}
{{- default (include "voucher-operator.fullname" .) .Values.controller.leaseName -}}
{{- end -}}

{{/* Where the admin endpoints create Vouchers: a namespace the controller watches. */}}
{{/* The namespaces whose Vouchers may claim codes: the values', or the admin namespace. */}}
{{- define "voucher-operator.issuerNamespaces" -}}
{{- if .Values.controller.issuerNamespaces -}}
{{- join "," .Values.controller.issuerNamespaces -}}
{{- else -}}
{{- include "voucher-operator.adminNamespace" . -}}
{{- end -}}
{{- end -}}

{{- define "voucher-operator.adminNamespace" -}}
{{- default (default .Release.Namespace .Values.controller.watchNamespace) .Values.server.adminNamespace -}}
{{- end -}}

{{/* The restricted Pod Security Standard, for every container: the image runs as a non-root user. */}}
{{- define "voucher-operator.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* The database settings every container that opens the database reads. */}}
{{/* The database variables; `migration` true for the init container (the schema owner's URL, when given). */}}
{{- define "voucher-operator.databaseEnv" -}}
- name: DATABASE_URL
  valueFrom:
    secretKeyRef:
      {{- if and .migration .root.Values.database.migrationSecret }}
      name: {{ .root.Values.database.migrationSecret }}
      key: {{ .root.Values.database.migrationUrlKey }}
      {{- else }}
      name: {{ .root.Values.database.existingSecret }}
      key: {{ .root.Values.database.urlKey }}
      {{- end }}
- name: DATABASE_MAX_CONNECTIONS
  value: {{ .root.Values.database.maxConnections | int64 | quote }}
- name: DATABASE_CONNECT_TIMEOUT
  value: {{ .root.Values.database.connectTimeout | quote }}
{{- if .root.Values.database.caSecret }}
# TLS to the database, its certificate verified against database.caSecret (the URL's own sslmode
# and sslrootcert, when it has them, still win).
- name: PGSSLMODE
  value: verify-full
- name: PGSSLROOTCERT
  value: /etc/voucher-operator/database-ca/ca.crt
{{- end }}
{{- end -}}

{{/* The volume of database.caSecret's CA, when set (a list item of a pod's volumes). */}}
{{- define "voucher-operator.databaseCaVolume" -}}
{{- if .Values.database.caSecret }}
- name: database-ca
  secret:
    secretName: {{ .Values.database.caSecret }}
    defaultMode: 0444
    items:
      - key: {{ .Values.database.caKey }}
        path: ca.crt
{{- end }}
{{- end -}}

{{/* Its mount, in every container that opens the database. */}}
{{- define "voucher-operator.databaseCaMount" -}}
{{- if .Values.database.caSecret }}
- name: database-ca
  mountPath: /etc/voucher-operator/database-ca
  readOnly: true
{{- end }}
{{- end -}}

{{- define "voucher-operator.loggingEnv" -}}
- name: LOG_FORMAT
  value: {{ .Values.logging.format | quote }}
- name: RUST_LOG
  value: {{ .Values.logging.level | quote }}
{{- end -}}

{{/* The two settings without a default; the schema allows them empty so that this message names them. */}}
{{- define "voucher-operator.checkRequired" -}}
{{- if not .Values.database.existingSecret -}}
{{- fail "set database.existingSecret: the name of a Secret holding the billing database URL (key database.urlKey)" -}}
{{- end -}}
{{- with .Values.controller.watchNamespace -}}
{{- if and $.Values.server.adminNamespace (ne $.Values.server.adminNamespace .) -}}
{{- fail (printf "server.adminNamespace (%s) must be controller.watchNamespace (%s): the controller would never reconcile the Vouchers the admin endpoints create" $.Values.server.adminNamespace .) -}}
{{- end -}}
{{- end -}}
{{- $keys := .Values.controller.campaignKeyNamespace -}}
{{- if or (eq $keys .Release.Namespace) (eq $keys (include "voucher-operator.adminNamespace" .)) -}}
{{- fail (printf "controller.campaignKeyNamespace (%s) must be a namespace of its own: the controller may read every Secret there, and the release and admin namespaces hold the operator's credentials (its signing secret, database URLs, NATS credentials)" $keys) -}}
{{- end -}}
{{- if and .Values.auth.jwksUrl (not (and .Values.auth.issuer .Values.auth.audience)) -}}
{{- fail "auth.jwksUrl needs auth.issuer and auth.audience: without them a token of any realm, issued for any other service, would be accepted" -}}
{{- end -}}
{{- if not (or .Values.auth.existingSecret .Values.auth.jwksUrl) -}}
{{- fail "set auth.existingSecret (a Secret holding the HS256 secret) or auth.jwksUrl: the redeem and admin endpoints verify bearer tokens" -}}
{{- end -}}
{{- if .Values.networkPolicy.enabled -}}
{{- $egress := .Values.networkPolicy.egress -}}
{{- if not $egress.dns.to -}}
{{- fail "set networkPolicy.egress.dns.to: the cluster's DNS resolver, as NetworkPolicy peers (the default names kube-system's k8s-app: kube-dns pods); port 53 to any address would carry data out" -}}
{{- end -}}
{{- if not $egress.database.to -}}
{{- fail "set networkPolicy.egress.database.to: where the billing database is, as NetworkPolicy peers (e.g. [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: billing}}}] or [{ipBlock: {cidr: 10.0.5.7/32}}]); egress goes only to named destinations (or set networkPolicy.enabled: false)" -}}
{{- end -}}
{{- if not $egress.kubernetesApi.to -}}
{{- fail "set networkPolicy.egress.kubernetesApi.to: the API server's addresses as ipBlocks (kubectl get endpointslice -n default kubernetes -o jsonpath='{.endpoints[*].addresses[*]}', each as <ip>/32); egress goes only to named destinations (or set networkPolicy.enabled: false)" -}}
{{- end -}}
{{- if and .Values.audit.relay (not $egress.nats.to) -}}
{{- fail "set networkPolicy.egress.nats.to: where NATS runs, as NetworkPolicy peers; egress goes only to named destinations" -}}
{{- end -}}
{{- if and .Values.auth.jwksUrl (not $egress.identityProvider.to) -}}
{{- fail "set networkPolicy.egress.identityProvider.to: the host of auth.jwksUrl, as NetworkPolicy peers (an ipBlock for an outside identity provider); egress goes only to named destinations" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* What both Deployments' pods share, before the containers (dict root component). */}}
{{- define "voucher-operator.podCommon" -}}
{{- $values := .root.Values -}}
{{- with $values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $values.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
# On SIGTERM the controller releases the Lease (another replica leads within
# controller.leaseDuration); the server waits for its endpoints to go, then drains.
terminationGracePeriodSeconds: {{ $values.terminationGracePeriodSeconds }}
securityContext:
  runAsNonRoot: true
  runAsUser: 65532
  runAsGroup: 65532
  fsGroup: 65532
  seccompProfile:
    type: RuntimeDefault
{{- end -}}

{{/* Where both Deployments' pods run (dict root component); spread by the pods of one Deployment. */}}
{{- define "voucher-operator.podPlacement" -}}
{{- $values := .root.Values -}}
{{- $selector := include "voucher-operator.componentSelectorLabels" . | fromYaml -}}
{{- with $values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $values.topologySpreadConstraints }}
topologySpreadConstraints:
  {{- range . }}
  - {{- toYaml (merge (deepCopy .) (dict "labelSelector" (dict "matchLabels" $selector))) | nindent 4 }}
  {{- end }}
{{- end }}
{{- end -}}

{{/* How a container reaches NATS (the controller's relay, the hub): the URL, the credentials each
used when its key is in nats.existingSecret, the creds file and CA mounted from it. */}}
{{- define "voucher-operator.natsEnv" -}}
- name: NATS_URL
  value: {{ .Values.nats.url | quote }}
{{- with .Values.nats.existingSecret }}
# The NATS credentials, each used when its key is in the Secret.
- name: NATS_USER
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: user
      optional: true
- name: NATS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: password
      optional: true
{{- end }}
{{- if .Values.nats.credsKey }}
- name: NATS_CREDS_FILE
  value: /etc/voucher-operator/nats/{{ .Values.nats.credsKey }}
{{- end }}
{{- if .Values.nats.caKey }}
- name: NATS_TLS_CA
  value: /etc/voucher-operator/nats/{{ .Values.nats.caKey }}
{{- end }}
- name: NATS_TLS_REQUIRED
  value: {{ .Values.nats.tlsRequired | quote }}
{{- end -}}

{{/*
Non-empty when the server claims customers at the vendor's hub (perCustomer: Global): this
Sovereign joined (federation.sovereign) and the vendor's claim key given.
*/}}
{{- define "voucher-operator.claims" -}}
{{- if and .Values.federation.sovereign .Values.federation.claimKey.existingSecret -}}
true
{{- end -}}
{{- end }}
