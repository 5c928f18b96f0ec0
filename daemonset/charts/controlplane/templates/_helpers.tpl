{{/* The labels every object of the mesh's charts carries. Call with (dict "root" $ "app" NAME). */}}
{{- define "controlplane.labels" -}}
app: {{ .app }}
app.kubernetes.io/name: {{ .app }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/version: {{ .root.Values.tag | default .root.Chart.AppVersion | quote }}
app.kubernetes.io/part-of: ambient-mesh
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version | replace "+" "_" }}
{{- end }}

{{/* The mesh image, <hub>/<image>:<tag>; the tag defaults to the chart's appVersion. */}}
{{- define "controlplane.image" -}}
{{- $tag := .Values.tag | default .Chart.AppVersion -}}
{{- if .Values.hub -}}
{{ printf "%s/%s:%s" .Values.hub .Values.image $tag }}
{{- else -}}
{{ printf "%s:%s" .Values.image $tag }}
{{- end -}}
{{- end }}

{{/* The RBAC rules of files/rbac.yaml: (dict "root" $ "scope" "clusterRules"|"namespaceRules"). */}}
{{- define "controlplane.rules" -}}
{{- $rbac := .root.Files.Get "files/rbac.yaml" | fromYaml -}}
{{- if hasKey $rbac "Error" }}{{ fail (printf "files/rbac.yaml: %s" $rbac.Error) }}{{ end -}}
{{- toYaml (index $rbac .scope) }}
{{- end }}

{{/* policy/v1 where the API server serves it (Kubernetes >= 1.21), else policy/v1beta1.
     Both checks: `helm template` always "has" policy/v1, whatever --kube-version says;
     discovery of a real 1.20 API server has no policy/v1. */}}
{{- define "controlplane.pdbApiVersion" -}}
{{- if and (.Capabilities.APIVersions.Has "policy/v1") (semverCompare ">=1.21-0" .Capabilities.KubeVersion.Version) -}}
policy/v1
{{- else -}}
policy/v1beta1
{{- end -}}
{{- end }}
